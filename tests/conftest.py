"""Shared test helpers: an in-process server, a line-based test client, polling.

Every test talks to a real server over real sockets on 127.0.0.1, on a port
the OS picks (port 0). Nothing sleeps: every wait polls against a deadline.
"""

import contextlib
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import chat_server  # noqa: E402  (after the path is set)

SERVER_SCRIPT = os.path.join(ROOT, "chat_server.py")
TIMEOUT = 5.0  # seconds: long enough for a loaded CI machine, short enough to fail fast


def pytest_configure(config):
    # An exception escaping any thread (a writer, a reader) fails the test.
    config.addinivalue_line(
        "filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning"
    )
    config.addinivalue_line("markers", "browser: drives a real Chromium (tests/test_chromium.py)")
    config.addinivalue_line("markers", "redis: needs redis-server (tests/test_redis.py)")
    # The summary says why a test was skipped (no Chromium, no redis-server):
    # pytest's -rs, for every way of running the tests.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


# .ci/run sets CHAT_TESTS_REQUIRE (for example "chromium,redis-server") so that
# tests needing those programs fail instead of skipping when they are missing.
REQUIRED_TOOLS = {name.strip() for name in os.environ.get("CHAT_TESTS_REQUIRE", "").split(",")
                  if name.strip()}


def find_tool(name):
    """The path of a program the tests need, or skip (fail under CI) without it."""
    path = shutil.which(name)
    if path is None:
        message = "%s is not installed (apt-get install %s)" % (name, name)
        if name in REQUIRED_TOOLS:
            pytest.fail(message + ", and CHAT_TESTS_REQUIRE asks for it")
        pytest.skip(message)
    return path


def wait_until(condition, timeout=TIMEOUT, message="condition"):
    """Poll condition() until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for %s" % message)
        time.sleep(0.01)  # a polling interval, not a wait for an event


class LineExpectations:
    """join(), expect() and expect_next() for a test client whose read_line()
    returns the server's next line (None at the end) and records it in seen.

    ChatClient (TCP) and websocket_client.ChatSocket (a browser) share them.
    """

    def expect_closed(self, timeout=None):
        """Read until the server closes the connection (for a browser: its close
        frame); return the lines read. Fail if it is still open at the deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        start = len(self.seen)
        try:
            while self.read_line(max(0.001, deadline - time.monotonic())) is not None:
                pass
        except ConnectionError:  # a reset: closed all the same
            pass
        except socket.timeout:
            pytest.fail("connection still open; got %r" % self.seen[start:])
        return self.seen[start:]

    def join(self, name):
        """Give a name at once (before the prompt, as a script would) and wait to be in.

        The server reads the name when it asks, without its short wait for a
        browser. Returns self.
        """
        self.send(name)
        self.expect("*** Online now")
        return self

    def expect(self, text, timeout=None):
        """Read lines until one contains text; return it, or fail listing what came.

        It skips the lines before: where the test means the very next line,
        use expect_next(), so that an extra or doubled line is noticed.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        start = len(self.seen)
        try:
            while True:
                line = self.read_line(max(0.001, deadline - time.monotonic()))
                if line is None:
                    break
                if text in line:
                    return line
        except (socket.timeout, ConnectionError):
            pass
        pytest.fail("expected %r, got %r" % (text, self.seen[start:]))

    def expect_next(self, text, timeout=None):
        """The very next line must contain text."""
        line = self.read_line(timeout)
        assert line is not None and text in line, "expected %r next, got %r" % (text, line)
        return line

    def expect_nothing_before(self, sender, sentinel="sentinel"):
        """Prove no other line arrived: a sentinel from sender (joined) comes next."""
        sender.send(sentinel)
        self.expect_next(sentinel)


class ChatClient(LineExpectations):
    """A test client with its own byte buffer; every read has a deadline."""

    def __init__(self, address, timeout=TIMEOUT, rcvbuf=None):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        # Each line leaves at once, as PuTTY's do. With Nagle, a second line in a
        # row waits for the server's delayed ACK (40 ms on Linux) in most tests.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:  # set before connecting, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.timeout = timeout
        self.buffer = b""
        self.seen = []  # every line read so far, for failure messages

    def send(self, line):
        """Send one line, ended with CR LF as telnet does."""
        self.send_raw(line.encode("utf-8") + b"\r\n")

    def send_raw(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        """Read more bytes into the buffer; return False at end of stream."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_raw_line(self, timeout=None):
        """The next line as bytes, with its line end; b'' at end of stream."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buffer:
            if not self._fill(deadline):
                rest, self.buffer = self.buffer, b""
                return rest
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_line(self, timeout=None):
        """The next line as text without its line end; None at end of stream."""
        raw = self.read_raw_line(timeout)
        if not raw:
            return None
        line = raw.decode("utf-8").rstrip("\r\n")
        self.seen.append(line)
        return line

    def expect_bytes(self, data, timeout=None):
        """Read until the raw bytes data have arrived (telnet answers, say)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while data not in self.buffer:
                if not self._fill(deadline):
                    break
        except socket.timeout:
            pass
        assert data in self.buffer, "expected %r in %r" % (data, self.buffer[-200:])

    def reset(self):
        """Close abruptly: the server sees a reset, not a clean end."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        self.sock.close()

    def close(self):
        self.sock.close()


def start_in_thread(server):
    thread = threading.Thread(
        # A short poll: shutdown() waits for it, at the end of every test.
        target=server.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True
    )
    thread.start()
    return thread


@pytest.fixture
def start_server_at():
    """A factory: start_server_at(host, max_clients=2, ...) runs a ChatServer in-process."""
    running = []

    def start(host, transcript=None, **settings):
        server = chat_server.ChatServer((host, 0), chat_server.Settings(**settings), transcript)
        running.append((server, start_in_thread(server)))
        return server

    yield start
    for server, thread in running:
        server.close_room()
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
def start_server(start_server_at):
    """A factory: start_server(max_clients=2, ...) runs a ChatServer on 127.0.0.1."""
    return lambda **options: start_server_at("127.0.0.1", **options)


@pytest.fixture
def server(start_server):
    """A server with the default settings."""
    return start_server()


@pytest.fixture
def connect(server):
    """A factory: connect() opens a ChatClient to the server; all are closed after."""
    with contextlib.ExitStack() as stack:

        def open_client(target=None, **options):
            address = (target or server).server_address
            client = ChatClient(address, **options)
            stack.callback(client.close)
            return client

        yield open_client


@pytest.fixture
def joined(connect):
    """A factory: joined("alice") connects and finishes the name prompt."""

    def join(name, target=None, **options):
        return connect(target, **options).join(name)

    return join


@pytest.fixture(autouse=True)
def no_errors_logged(caplog):
    """No test may make the server log an error or a traceback."""
    caplog.set_level(logging.INFO, logger="chat_server")
    yield
    # caplog.records would hold this phase's records only (the teardown's).
    bad = [r for phase in ("setup", "call", "teardown") for r in caplog.get_records(phase)
           if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "the server logged errors: %r" % [r.getMessage() for r in bad]


class ServerProcess:
    """chat_server.py running as a real process; its stderr is read as it comes."""

    def __init__(self, *flags, stdin=subprocess.DEVNULL, launcher=None):
        # launcher: Python code (for -c) that prepares, then runs the script.
        prefix = ["-c", launcher] if launcher else []
        self.process = subprocess.Popen(
            [sys.executable, "-u", *prefix, SERVER_SCRIPT, "--port", "0", *flags],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.log = queue.Queue()  # stderr lines; a pipe that is never read fills up
        self.log_seen = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        banner = self.expect_log("Listening on")
        self.port = int(banner.split("Listening on ")[1].split()[0].rsplit(":", 1)[1])

    def _read_stderr(self):
        for raw in self.process.stderr:
            self.log.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self.log.put(None)

    def expect_log(self, text, timeout=TIMEOUT):
        """Read stderr lines until one contains text; fail after timeout."""
        deadline = time.monotonic() + timeout
        start = len(self.log_seen)
        while True:
            try:
                line = self.log.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail("expected %r on stderr, got %r" % (text, self.log_seen[start:]))
            self.log_seen.append(line)
            if text in line:
                return line

    def stderr_text(self):
        """Everything on stderr so far (call after the process has ended)."""
        while True:
            try:
                line = self.log.get(timeout=TIMEOUT)
            except queue.Empty:
                break
            if line is None:
                break
            self.log_seen.append(line)
        return "\n".join(self.log_seen)

    def client(self, **options):
        return ChatClient(("127.0.0.1", self.port), **options)

    def join(self, name, **options):
        """A client that has joined as name."""
        return self.client(**options).join(name)

    def type(self, line):
        """Type a line at the server's console (started with stdin=PIPE)."""
        self.process.stdin.write(line.encode("utf-8") + b"\n")
        self.process.stdin.flush()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()


@contextlib.contextmanager
def server_process(*flags, stdin=subprocess.DEVNULL, launcher=None):
    """Run chat_server.py as a real process on a free port; yield a ServerProcess."""
    server = ServerProcess(*flags, stdin=stdin, launcher=launcher)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def room(joined):
    """A factory: room("alice", "bob") joins each, and earlier ones read later joins.

    So each returned client's next line is whatever happens after the setup.
    """

    def make(*names, target=None):
        clients = []
        for name in names:
            newcomer = joined(name, target)
            for client in clients:
                client.expect_next("*** %s joined the chat." % name)
            clients.append(newcomer)
        return clients

    return make


# --- The teacher's console, for in-process servers ---

@pytest.fixture
def console(server):
    """The teacher's console of the default in-process server, fed by the test."""
    return chat_server.TeacherConsole(server, stream=None)


def console_lines(caplog):
    """Every line the server has shown on its console so far."""
    return [record.getMessage() for record in caplog.records]


def expect_console(caplog, text):
    """Wait until the console has shown a line containing text; return that line."""
    found = []
    wait_until(lambda: found.extend(line for line in console_lines(caplog) if text in line)
               or found, message="%r on the console" % text)
    return found[0]


# --- Shorter fixed delays for in-process servers ---

QUICK_DELAYS = {
    # Every password answer waits this long (tests that time it read the
    # patched value, so they still prove that the delay is there).
    "PASSWORD_ANSWER_SECONDS": 0.1,
    # A test client that speaks first does so at once; one that waits for the
    # welcome waits this long. (Not for Chromium: its spare sockets connect
    # early and speak late.)
    "BROWSER_WAIT_SECONDS": 0.05,
}


@pytest.fixture(autouse=True)
def quick_delays(request, monkeypatch):
    """Shorter fixed delays, so the suite is quick; each test can set its own."""
    for name, seconds in QUICK_DELAYS.items():
        if name == "BROWSER_WAIT_SECONDS" and request.node.get_closest_marker("browser"):
            continue
        monkeypatch.setattr(chat_server, name, seconds)
