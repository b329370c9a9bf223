"""Will chat_server.py hold my class? A load test you run on the server's computer.

    python tests/benchmark.py            # about three minutes
    python tests/benchmark.py --quick    # under a minute
    python tests/benchmark.py --redis    # fan-out and classroom: one server
                                         # alone, then two linked through Redis

Standard library only; not collected by pytest. It starts chat_server.py as
a subprocess on a free 127.0.0.1 port (flood limit off, connection and queue
limits raised by flags), drives it with real sockets from one thread and one
selector loop, and prints one table:

  capacity    N clients join; time until a watcher has seen every join
  fan-out     R receivers, S senders sending as fast as the server takes
              lines; delivered lines a second over all receivers, and a
              check that nothing was lost or reordered per sender
  classroom   60 clients each send a line a second; latency from send to
              receipt, p50 / p99 / max over all recipients
  slow reader the classroom plus one client that joins and never reads (and
              one bulk sender, so its buffers fill in seconds, not minutes);
              the others' delivered share and p99, the server's RSS over
              time, and when the slow client was dropped

Fan-out and classroom run twice: all clients on TCP, then half of the
receivers (the classroom: half the clients) on WebSockets, as browser
students are; the second row gives its figure as a multiple of the first
(for latency: all-TCP's latency divided by this one's, so 1.00x is as fast).
With few clients a p99 is one stall or two: compare p50s across runs.

With --redis (needs redis-server on the PATH; one is started on a free
port and killed at the end), fan-out and classroom run on one server
alone, then on two servers linked through that Redis, with the clients
split between them (even ones on the first, odd on the second); the two
alternate for --rounds rounds (3), and a last line gives the median of
what the hop cost in each (about five minutes). Then Redis alone is
timed: an XADD from this script to two readers blocked in XREAD, no chat
server at all: what this machine adds to any hop, whatever the server does.

Every phase is bounded in count and time. Server RSS, threads and CPU come
from /proc (Linux); elsewhere they show as "-". The generator's own CPU is
printed too: near 100% means it, not the server, was the limit.
"""

import argparse
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chat_server.py")
PHASE_BOUND_SECONDS = 60  # no phase runs longer than this
RECV_BYTES = 256 * 1024
FANOUT_WINDOW_LINES = 256  # lines in flight per sender and receiver (closed loop)
FANOUT_RE = re.compile(rb" says: ~F (\d+) (\d+) ")  # sender number, sequence number
LATENCY_RE = re.compile(rb" says: ~L (\d+) ")  # send time, in ns
JOINED = b" joined the chat."
UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
ZERO_MASK = b"\0\0\0\0"  # a valid mask that leaves the text as it is: cheap to send


def websocket_frames(data):
    """Lines (CR LF-ended bytes) as masked text frames, one frame per line."""
    frames = []
    for line in data.split(b"\r\n")[:-1]:
        size = len(line)
        header = (bytes([0x81, 0x80 | size]) if size < 126
                  else bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big"))
        frames.append(header + ZERO_MASK + line)
    return b"".join(frames)


# --- The server under test ---

class Server:
    """chat_server.py as a subprocess; its output goes to a log file."""

    def __init__(self, *flags):
        self.log = open(os.devnull, "wb")
        self.process = subprocess.Popen(
            # Every client connects from 127.0.0.1: no per-address limits.
            [sys.executable, SERVER, "--port", "0", "--flood-rate", "0", "--history", "0",
             "--per-address", "0", *flags],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.PIPE,
        )
        for _ in range(5):  # "Linked through Redis" comes first with --redis
            line = self.process.stderr.readline().decode()
            match = re.search(r"Listening on 127\.0\.0\.1:(\d+)", line)
            if match or not line:
                break
        if not match:
            raise SystemExit("the server did not start: %r" % line)
        self.port = int(match.group(1))
        # Keep reading its console, or a full pipe would stall its log thread.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for _ in self.process.stderr:
            pass

    def stats(self):
        """(RSS in MB, threads, CPU seconds), or None where /proc is missing."""
        try:
            with open("/proc/%d/status" % self.process.pid) as status:
                fields = dict(line.split(":", 1) for line in status)
            with open("/proc/%d/stat" % self.process.pid) as stat:
                ticks = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"]), cpu

    def stop(self):
        if self.process.poll() is None:
            if sys.platform == "win32":
                self.process.terminate()  # Windows cannot send a child Ctrl+C
            else:
                self.process.send_signal(signal.SIGINT)  # the Ctrl+C path
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# --- The generator: many non-blocking clients in one selector loop ---

class Peer:
    """One client connection of the generator."""

    def __init__(self, swarm, port, name, rcvbuf=None, reads=True, websocket=False):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.name = name
        self.pending = b""  # the unfinished last line of what arrived
        self.outbox = bytearray()
        self.closed = False
        self.joined = False  # the server has welcomed it
        self.on_data = None  # called with each chunk of complete lines
        self.swarm = swarm
        self.events = selectors.EVENT_READ if reads else 0
        if reads:
            swarm.selector.register(self.sock, self.events, self)
        # A browser student: the upgrade, then frames (None: a TCP client).
        self.frames = bytearray() if websocket else None
        self.upgraded = not websocket
        if websocket:
            self.outbox += UPGRADE  # the name frame may follow at once
        self.send(name.encode() + b"\r\n")

    def send(self, data):
        self.outbox += data if self.frames is None else websocket_frames(data)
        self._flush()

    def _unframe(self, data):
        """The text carried by whole frames received so far (after the 101 head)."""
        self.frames += data
        if not self.upgraded:
            end = self.frames.find(b"\r\n\r\n")
            if end < 0:
                return b""
            del self.frames[:end + 4]
            self.upgraded = True
        text, frames, at = [], self.frames, 0
        while len(frames) - at >= 2:
            size = frames[at + 1] & 0x7F
            start = at + {126: 4, 127: 10}.get(size, 2)
            if len(frames) < start:
                break
            if size >= 126:
                size = int.from_bytes(frames[at + 2:start], "big")
            if len(frames) < start + size:
                break
            if frames[at] & 0x0F == 0x1:  # text; a close frame just ends the stream
                text.append(frames[start:start + size])
            at = start + size
        del frames[:at]
        return b"".join(text)

    def _flush(self):
        try:
            sent = self.sock.send(self.outbox) if self.outbox else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self.closed = True
            return
        del self.outbox[:sent]
        self._want_write(bool(self.outbox))

    def _want_write(self, wanted):
        events = (self.events & selectors.EVENT_READ) | (selectors.EVENT_WRITE if wanted else 0)
        if events == self.events:
            return
        if self.events and events:
            self.swarm.selector.modify(self.sock, events, self)
        elif events:
            self.swarm.selector.register(self.sock, events, self)
        else:
            self.swarm.selector.unregister(self.sock)
        self.events = events

    def readable(self):
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            self.swarm.selector.unregister(self.sock)
            self.events = 0
            return
        if self.frames is not None:
            data = self._unframe(data)
        data = self.pending + data
        if not self.joined and b"*** Online now" in data:
            self.joined = True
        cut = data.rfind(b"\n") + 1
        self.pending = data[cut:]
        if cut and self.on_data:
            self.on_data(self, data[:cut])

    def close(self):
        if self.events:
            self.swarm.selector.unregister(self.sock)
            self.events = 0
        self.sock.close()


class Swarm:
    """Every Peer of a phase, served by one selector loop."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.peers = []

    def add(self, port, name, **options):
        peer = Peer(self, port, name, **options)
        self.peers.append(peer)
        return peer

    def run_until(self, done, seconds, tick=None):
        """Serve sockets until done() is true or seconds pass; True if done."""
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                return False
            for key, events in self.selector.select(0.05):
                peer = key.data
                if events & selectors.EVENT_WRITE:
                    peer._flush()
                if events & selectors.EVENT_READ:
                    peer.readable()
            if tick:
                tick()
        return True

    def close(self):
        for peer in self.peers:
            peer.close()
        self.selector.close()


def cpu_seconds():
    times = os.times()
    return times.user + times.system


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Measure:
    """Server and generator CPU (as % of one core) and RSS over one phase.

    For several linked servers, their RSS, threads and CPU are added up.
    """

    def __init__(self, server):
        self.server = server if isinstance(server, Server) else Together(server)
        self.start = time.monotonic()
        self.gen = cpu_seconds()
        stats = self.server.stats()
        self.srv = stats[2] if stats else None

    def finish(self):
        elapsed = max(time.monotonic() - self.start, 1e-9)
        stats = self.server.stats()
        gen = 100 * (cpu_seconds() - self.gen) / elapsed
        srv = 100 * (stats[2] - self.srv) / elapsed if stats and self.srv is not None else None
        return {"rss": stats[0] if stats else None, "threads": stats[1] if stats else None,
                "srv_cpu": srv, "gen_cpu": gen}


class Together:
    """Several servers seen as one, for Measure."""

    def __init__(self, servers):
        self.servers = servers

    def stats(self):
        stats = [server.stats() for server in self.servers]
        if None in stats:
            return None
        return tuple(sum(values) for values in zip(*stats))


# --- Linked servers (--redis) ---

REDIS = {"port": None, "rooms": 0}  # set by main() with --redis


class RedisServer:
    """redis-server on a free 127.0.0.1 port, nothing saved to disk."""

    def __init__(self, path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # polling for start-up, bounded
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)

    def stop(self):
        self.process.kill()
        self.process.wait()


def start_servers(*flags):
    """One server, or (with --redis) two servers linked in a fresh room."""
    if REDIS["port"] is None:
        return [Server(*flags)]
    REDIS["rooms"] += 1
    url = "redis://127.0.0.1:%d/bench%d" % (REDIS["port"], REDIS["rooms"])
    return [Server("--redis", url, *flags) for _ in range(2)]


def port_for(servers, index):
    """Clients are split between the servers: even ones on the first."""
    return servers[index % len(servers)].port


# --- The scenarios ---

def capacity(clients):
    """clients join in bursts of 64, as a class does; a watcher sees every join."""
    server = Server("--max-clients", str(clients + 10))
    swarm = Swarm()
    try:
        joins = [0]

        def count_joins(peer, data):
            joins[0] += data.count(JOINED)

        watcher = swarm.add(server.port, "w")
        watcher.on_data = count_joins
        swarm.run_until(lambda: watcher.joined, PHASE_BOUND_SECONDS)
        measure = Measure(server)
        started = time.monotonic()
        for number in range(clients):
            swarm.add(server.port, "c%d" % number)  # the rest only drain their socket
            if number % 64 == 63:
                swarm.run_until(lambda: joins[0] > number - 64, PHASE_BOUND_SECONDS)
        done = swarm.run_until(lambda: joins[0] >= clients, PHASE_BOUND_SECONDS)
        took = time.monotonic() - started
        result = measure.finish()
        result["result"] = ("all joined in %.2f s" % took if done
                            else "only %d of %d joined" % (joins[0], clients))
        return result
    finally:
        swarm.close()
        server.stop()


def fanout(receivers, senders, lines, browsers=False):
    """senders send lines each as fast as the server takes them, to receivers.

    browsers: every other receiver is on a WebSocket.
    """
    servers = start_servers("--max-clients", str(receivers + senders + 10),
                            "--sendq", str(16 << 20))
    swarm = Swarm()
    try:
        received = [[0] * senders for _ in range(receivers)]  # last sequence seen
        delivered = [0]
        out_of_order = [0]

        def make_reader(index):
            last = received[index]

            def on_data(peer, data):
                for sender, sequence in FANOUT_RE.findall(data):
                    sender, sequence = int(sender), int(sequence)
                    if sequence != last[sender] + 1:
                        out_of_order[0] += 1
                    last[sender] = sequence
                    delivered[0] += 1
            return on_data

        readers = []
        for index in range(receivers):
            reader = swarm.add(port_for(servers, index), "r%d" % index,
                               websocket=browsers and index % 2 == 1)
            reader.on_data = make_reader(index)
            readers.append(reader)
        talkers = [swarm.add(port_for(servers, index), "s%d" % index)
                   for index in range(senders)]
        swarm.run_until(lambda: all(peer.joined for peer in swarm.peers), PHASE_BOUND_SECONDS)
        sent = [0] * senders
        padding = b"x" * 40

        def keep_sending():
            # Closed loop: a sender is at most FANOUT_WINDOW_LINES ahead of
            # the slowest receiver, so the server's outboxes stay small.
            for index, talker in enumerate(talkers):
                slowest = min(row[index] for row in received)
                left = lines - sent[index]
                burst = min(left, FANOUT_WINDOW_LINES - (sent[index] - slowest))
                # Bursts of at least 32 lines (fewer, bigger sends), but the last few too.
                if (burst >= 32 or burst == left > 0) and len(talker.outbox) < 65536:
                    start = sent[index] + 1
                    talker.send(b"".join(b"~F %d %d %s\r\n" % (index, n, padding)
                                         for n in range(start, start + burst)))
                    sent[index] += burst

        measure = Measure(servers)
        started = time.monotonic()
        expected = receivers * senders * lines
        done = swarm.run_until(lambda: delivered[0] >= expected, PHASE_BOUND_SECONDS,
                               tick=keep_sending)
        took = time.monotonic() - started
        result = measure.finish()
        verdict = "all in order" if done and not out_of_order[0] else (
            "%d of %d, %d out of order" % (delivered[0], expected, out_of_order[0]))
        result["rate"] = delivered[0] / took
        result["result"] = "%.0f lines/s; %s" % (result["rate"], verdict)
        return result
    finally:
        swarm.close()
        for server in servers:
            server.stop()


def classroom(clients, seconds, slow_reader=False, browsers=False):
    """clients each send one line a second; optionally a slow reader and a bulk sender.

    browsers: every other client is on a WebSocket.
    """
    servers = start_servers("--max-clients", str(clients + 10))
    server = servers[0]
    swarm = Swarm()
    try:
        latencies = []
        slow_left_at = [None]

        def on_data(peer, data):
            now = time.monotonic_ns()
            for sent_ns in LATENCY_RE.findall(data):
                latencies.append((now - int(sent_ns)) / 1e6)
            if slow_left_at[0] is None and b"slow left the chat." in data:
                slow_left_at[0] = time.monotonic()

        talkers = []
        for index in range(clients):
            talker = swarm.add(port_for(servers, index), "t%d" % index,
                               websocket=browsers and index % 2 == 1)
            talker.on_data = on_data
            talkers.append(talker)
        swarm.run_until(lambda: all(peer.joined for peer in swarm.peers), PHASE_BOUND_SECONDS)
        bulk = None
        if slow_reader:
            bulk = swarm.add(server.port, "bulk")
            swarm.add(server.port, "slow", rcvbuf=4096, reads=False)  # never reads
        measure = Measure(servers)
        started = time.monotonic()
        said = [0]
        next_bulk = [started]
        rss_timeline = []

        def tick():
            now = time.monotonic()
            elapsed = now - started
            for index, talker in enumerate(talkers):
                # Staggered: talker i speaks at i/clients past each second.
                offset = index / clients
                due = 0 if elapsed < offset else min(seconds, int(elapsed - offset) + 1)
                while talker.sent_lines < due:
                    talker.send(b"~L %d hello\r\n" % time.monotonic_ns())
                    talker.sent_lines += 1
                    said[0] += 1
            while bulk is not None and now >= next_bulk[0] and now - started < seconds:
                bulk.send(b"bulk " + b"b" * 895 + b"\r\n")  # 500 lines/s of 900 bytes
                next_bulk[0] += 0.002
            if not rss_timeline or now - rss_timeline[-1][0] >= seconds / 5:
                stats = server.stats()
                rss_timeline.append((now, stats[0] if stats else None))

        for talker in talkers:
            talker.sent_lines = 0
        swarm.run_until(lambda: time.monotonic() - started >= seconds + 1, seconds + 10, tick=tick)
        expected = said[0] * (clients - 1)
        result = measure.finish()
        share = 100.0 * len(latencies) / expected if expected else 0
        result["p50"], result["p99"] = percentile(latencies, 0.5), percentile(latencies, 0.99)
        result["result"] = "delivered %.1f%%; p50 %.1f ms, p99 %.1f ms, max %.1f ms" % (
            share, percentile(latencies, 0.5), percentile(latencies, 0.99),
            max(latencies) if latencies else float("nan"))
        if slow_reader:
            left = ("dropped after %.1f s" % (slow_left_at[0] - started)
                    if slow_left_at[0] else "NOT dropped")
            rss = " ".join("%.0f" % mb for _, mb in rss_timeline if mb is not None)
            result["result"] += "; slow client %s; RSS MB over time: %s" % (left, rss or "-")
        return result
    finally:
        swarm.close()
        for server in servers:
            server.stop()


# --- The table ---

def row(scenario, setting, measured):
    def number(value, unit):
        return "-" if value is None else "%.0f%s" % (value, unit)

    print("%-12s %-26s %8s %8s %8s %8s  %s" % (
        scenario, setting, number(measured["rss"], " MB"), number(measured["threads"], ""),
        number(measured["srv_cpu"], "%"), number(measured["gen_cpu"], "%"),
        measured["result"]), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument("--redis", action="store_true", help="fan-out and classroom on one "
                        "server, then on two linked through a redis-server started here")
    parser.add_argument("--rounds", type=int, default=3, help="with --redis: how many times "
                        "to run the two settings, alternating (default: 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.redis:
        return compare_linked(quick, max(1, args.rounds))
    print("chat_server.py on %s, Python %s, %d cores" % (
        sys.platform, sys.version.split()[0], os.cpu_count() or 0))
    print("%-12s %-26s %8s %8s %8s %8s  %s" % (
        "scenario", "setting", "srv RSS", "threads", "srv CPU", "gen CPU", "result"))
    for clients in ((100, 300) if quick else (500, 2000)):
        row("capacity", "%d clients" % clients, capacity(clients))
    for receivers in ((10, 50) if quick else (50, 200)):
        for senders in (1, 4):
            lines = (100000 if quick else 400000) // (receivers * senders)
            setting = "%d receivers, %d sender%s" % (receivers, senders, "s" * (senders > 1))
            tcp = fanout(receivers, senders, max(lines, 200))
            row("fan-out", setting, tcp)
            half = fanout(receivers, senders, max(lines, 200), browsers=True)
            half["result"] += "; %.2fx all-TCP" % (half["rate"] / tcp["rate"])
            row("fan-out", "  half on WebSockets", half)
    seconds = 5 if quick else 20
    clients = 20 if quick else 60
    tcp = classroom(clients, seconds)
    row("classroom", "%d clients, %d s" % (clients, seconds), tcp)
    half = classroom(clients, seconds, browsers=True)
    # As a speed (all-TCP's latency / this one's): 1.00x is as fast, 0.80x a quarter slower.
    half["result"] += "; %.2fx all-TCP (p50), %.2fx (p99)" % (
        tcp["p50"] / half["p50"], tcp["p99"] / half["p99"])
    row("classroom", "  half on WebSockets", half)
    # The slow client's socket buffers hold a few MB: at 450 kB/s of bulk
    # lines they fill in about ten seconds, then its outbox does.
    row("slow reader", "%d clients + slow + bulk" % clients,
        classroom(clients, 15 if quick else 30, slow_reader=True))
    return 0


def compare_linked(quick, rounds):
    """Fan-out and classroom on one server alone, then on two linked through Redis.

    On a shared machine one run's figures move by more than the hop costs,
    so the two settings alternate for several rounds, and the summary gives
    the median of each round's difference (or ratio).
    """
    path = shutil.which("redis-server")
    if path is None:
        raise SystemExit("--redis needs redis-server on the PATH (apt-get install redis-server)")
    redis = RedisServer(path)
    print("chat_server.py on %s, Python %s, %d cores; %s, %d round%s" % (
        sys.platform, sys.version.split()[0], os.cpu_count() or 0,
        "one server, then two linked through Redis (clients split between them)",
        rounds, "s" * (rounds > 1)))
    print("%-12s %-26s %8s %8s %8s %8s  %s" % (
        "scenario", "setting", "srv RSS", "threads", "srv CPU", "gen CPU", "result"))
    seconds = 5 if quick else 20
    clients = 20 if quick else 60
    receivers = 10 if quick else 50
    lines = (20000 if quick else 200000) // (receivers * 4)
    p50s, p99s, rates = [], [], []
    try:
        for _ in range(rounds):
            measured = {}
            for linked in (False, True):
                REDIS["port"] = redis.port if linked else None
                how = "two linked" if linked else "one alone"
                room = measured["classroom", linked] = classroom(clients, seconds)
                row("classroom", "%d clients, %s" % (clients, how), room)
                fan = measured["fan-out", linked] = fanout(receivers, 4, max(lines, 200))
                row("fan-out", "%d recv, 4 send, %s" % (receivers, how), fan)
            alone, both = measured["classroom", False], measured["classroom", True]
            p50s.append(both["p50"] - alone["p50"])
            p99s.append(both["p99"] - alone["p99"])
            rates.append(measured["fan-out", True]["rate"] / measured["fan-out", False]["rate"])
        floor = bare_hop(redis.port)
    finally:
        redis.stop()
    print("The Redis hop, median of %d round%s: classroom p50 %+.1f ms, p99 %+.1f ms; "
          "fan-out two linked %.2fx one alone" % (rounds, "s" * (rounds > 1), median(p50s),
                                                  median(p99s), median(rates)))
    print("Redis itself, on this machine (an XADD to two blocked XREADs, no chat server): "
          "p50 %.1f ms, p99 %.1f ms" % floor)
    return 0


def bare_hop(port, entries=300, per_second=50):
    """Redis's own part of the hop: an XADD from this script to two readers
    blocked in XREAD (as two linked servers are), with no chat server at all.

    Return (p50, p99) in ms: what the machine adds whatever the server does.
    """
    def command(*args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            arg = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(parts)

    latencies, stream = [], "bare-hop"

    def read(sock):
        last = "$"
        while True:
            sock.sendall(command("XREAD", "BLOCK", 5000, "STREAMS", stream, last))
            data = sock.recv(65536)
            now = time.monotonic_ns()
            ids = re.findall(rb"\d{10,}-\d+", data)
            if not ids or b"~end" in data:
                return
            last = ids[-1].decode()
            latencies.extend((now - int(sent)) / 1e6 for sent in re.findall(rb"~L (\d+)", data))

    readers = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", port), 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        readers.append((sock, threading.Thread(target=read, args=(sock,), daemon=True)))
        readers[-1][1].start()
    with socket.create_connection(("127.0.0.1", port), 10) as writer:
        writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until both readers are blocked in XREAD
            writer.sendall(command("INFO", "clients"))
            if b"blocked_clients:2" in writer.recv(65536):
                break
            time.sleep(0.01)
        for index in range(entries + 1):
            text = b"~end" if index == entries else b"~L %d" % time.monotonic_ns()
            writer.sendall(command("XADD", stream, "*", "e", text))
            writer.recv(100)  # the entry's id
            time.sleep(1 / per_second)
    for sock, thread in readers:
        thread.join(10)
        sock.close()
    return percentile(latencies, 0.5), percentile(latencies, 0.99)


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


if __name__ == "__main__":
    sys.exit(main())
