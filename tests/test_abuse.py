"""One student cannot stop the lesson (tracker issue 8): limits per address,
moderation that sticks, names nobody can fake, no traceback, hang or loss.

Other computers are played by clients bound to 127.0.0.2, 127.0.0.3, ...
(all of 127.0.0.0/8 is loopback); signals and files by a real process.
"""

import collections
import contextlib
import errno
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

try:
    import resource  # POSIX only: a full disk is played by a file-size limit
except ImportError:
    resource = None

import chat_server
from chat_server import Addresses, Client, Settings, TeacherConsole, normal_host
from conftest import (SERVER_SCRIPT, TIMEOUT, ChatClient, console_lines, expect_console,
                      server_process, wait_until)
from websocket_client import ChatSocket

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and files")


# --- Helpers: other computers, the console, a slow reader ---------------------

class ClientFrom(ChatClient):
    """A ChatClient that connects from 127.0.0.N: a student on another computer."""

    def __init__(self, address, source, timeout=TIMEOUT, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connecting, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            self.sock.bind((source, 0))
        except OSError as error:  # macOS has only 127.0.0.1 unless told otherwise
            self.sock.close()
            pytest.skip("cannot bind to %s: %s" % (source, error))
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.timeout = timeout
        self.buffer = b""
        self.seen = []


@pytest.fixture
def computer():
    """A factory: computer(N, server) connects from 127.0.0.N; all closed after."""
    with contextlib.ExitStack() as stack:

        def open_client(number, target, **options):
            client = ClientFrom(target.server_address, "127.0.0.%d" % number, **options)
            stack.callback(client.close)
            return client

        yield open_client


@pytest.fixture
def crowd(computer):
    """A factory: crowd(server, (2, "bob"), (3, "alice")) joins each from 127.0.0.N,
    and earlier ones read later joins: each one's next line is what comes after."""

    def make(target, *students):
        clients = []
        for number, name in students:
            newcomer = computer(number, target).join(name)
            for client in clients:
                client.expect("*** %s joined the chat." % name)
            clients.append(newcomer)
        return clients

    return make


def read_until_closed(client, timeout=TIMEOUT):
    """Every line until the server closes; a reset fails the test (unlike expect_closed)."""
    deadline = time.monotonic() + timeout
    start = len(client.seen)
    while client.read_line(max(0.001, deadline - time.monotonic())) is not None:
        pass
    return client.seen[start:]


class RateReader(threading.Thread):
    """Reads a socket no faster than bytes_per_second, as a slow laptop does,
    until it has seen `wanted` lines containing `marker`, or the end."""

    def __init__(self, client, bytes_per_second, marker, wanted, timeout):
        super().__init__(daemon=True)
        self.client, self.rate = client, bytes_per_second
        self.marker, self.wanted, self.timeout = marker, wanted, timeout
        self.lines = []
        self.closed = False

    def run(self):
        sock, started, received, rest = self.client.sock, time.monotonic(), 0, b""
        deadline = started + self.timeout
        found = 0
        while found < self.wanted and time.monotonic() < deadline:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(4096)
            except socket.timeout:
                return
            except OSError:  # reset: dropped
                data = b""
            if not data:
                self.closed = True
                return
            received += len(data)
            *lines, rest = (rest + data).split(b"\r\n")
            self.lines += [line.decode("utf-8") for line in lines]
            found += sum(self.marker in line.decode("utf-8") for line in lines)
            # Pace the reading: never ahead of bytes_per_second.
            ahead = received / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


class Drain(threading.Thread):
    """Reads and discards everything sent to some clients, until stopped."""

    def __init__(self, clients):
        super().__init__(daemon=True)
        self.clients = clients
        self.stopped = threading.Event()

    def run(self):
        with selectors.DefaultSelector() as selector:
            for client in self.clients:
                selector.register(client.sock, selectors.EVENT_READ)
            while not self.stopped.is_set():
                for key, _ in selector.select(0.05):
                    try:
                        if not key.fileobj.recv(65536):
                            selector.unregister(key.fileobj)
                    except OSError:
                        selector.unregister(key.fileobj)

    def stop(self):
        self.stopped.set()
        self.join(TIMEOUT)


# --- One address cannot take the room -----------------------------------------

def test_connections_past_per_address_are_refused_before_a_thread(start_server, computer,
                                                                   caplog):
    server = start_server(per_address=2, max_clients=10)
    first, second = computer(2, server), computer(2, server)
    first.expect("What is your name?")
    second.expect("What is your name?")
    third = computer(2, server)
    assert read_until_closed(third) == [
        "*** Too many connections from your computer (2). Close one, then try again."]
    computer(3, server).expect("What is your name?")  # another computer still comes in
    # Console lines keep their order: once 127.0.0.3's is shown, so are the others.
    expect_console(caplog, "Accepted new client: 127.0.0.3")
    accepted = [line for line in console_lines(caplog)
                if line.startswith("Accepted new client: 127.0.0.2")]
    assert len(accepted) == 2  # the third never got a thread
    first.close()
    wait_until(lambda: server.places_taken() == 2, message="the first one to be gone")
    computer(2, server).expect("What is your name?")  # a place is free again


def test_the_console_says_once_what_to_do_for_a_lab_behind_one_address(
        start_server, computer, caplog):
    """The 9th student behind a school proxy is told to close a connection they
    do not have: the teacher, who can fix it, is told how."""
    server = start_server(per_address=1, max_clients=10)
    computer(2, server).expect("What is your name?")
    for _ in range(2):
        assert read_until_closed(computer(2, server))[-1].startswith("*** Too many connections")
    expect_console(caplog, "--per-address 0")
    wait_until(lambda: len([line for line in console_lines(caplog)
                            if line.startswith("Refused 127.0.0.2")]) == 2,
               message="both refusals on the console")
    hints = [line for line in console_lines(caplog) if "--per-address 0" in line]
    assert hints == ["If several students share that address (one shared machine, a "
                     "school proxy), restart the server with --per-address 0, or a number "
                     "as big as the class."]


def test_a_refused_client_sees_the_end_at_once_not_after_the_drain_time(
        start_server, computer, monkeypatch):
    """The refuser half-closes after its line: nc ends there, while it still reads."""
    monkeypatch.setattr(chat_server, "REFUSAL_DRAIN_SECONDS", 4 * TIMEOUT)  # far off
    server = start_server(per_address=1)
    computer(2, server).join("alice")
    refused = computer(2, server)
    assert read_until_closed(refused) == [
        "*** Too many connections from your computer (1). Close one, then try again."]


def test_refused_sockets_held_at_once_are_bounded(monkeypatch):
    """A student who opens refused connections as fast as they can cannot make the
    refuser hold more sockets than REFUSALS_AT_ONCE (each may wait for the drain)."""
    monkeypatch.setattr(chat_server, "REFUSALS_AT_ONCE", 4)
    monkeypatch.setattr(chat_server, "REFUSAL_DRAIN_SECONDS", 4 * TIMEOUT)  # far off
    monkeypatch.setattr(chat_server, "BROWSER_WAIT_SECONDS", 0.01)  # no browser here
    with socket.create_server(("127.0.0.1", 0)) as listener:
        refuser = chat_server.Refuser()
        students, refused = [], []
        for _ in range(20):  # never closed by the student: each would wait the drain
            student = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            students.append(student)
            refused.append(listener.accept()[0])
            refuser.refuse(refused[-1], "The room is full.")
            assert student.recv(1024) == b"*** The room is full.\r\n"  # told why
        # The last one told may be a moment from being closed.
        wait_until(lambda: sum(sock.fileno() != -1 for sock in refused) <= 4,
                   message="at most 4 refused sockets held")
        for student in students:
            student.close()


def connection_lines_from(host, caplog):
    """(lines shown about host's connections, lines counted instead) on the console."""
    shown, counted = 0, 0
    for line in console_lines(caplog):
        count = re.match(r"\((\d+) more lines? about connections from %s " % re.escape(host),
                         line)
        if count:
            counted += int(count.group(1))
        elif host + ":" in line:
            shown += 1
    return shown, counted


def test_slowing_down_lines_are_counted_with_a_computers_other_connection_lines(
        start_server, caplog, monkeypatch):
    monkeypatch.setattr(chat_server, "CONNECTION_LINES_SHOWN", 1)  # "Accepted" takes it
    monkeypatch.setattr(chat_server, "CONNECTION_LINES_SECONDS", 2.0)  # both lines in it
    monkeypatch.setattr(chat_server, "RECORDER_CHECK_SECONDS", 0.2)
    server = start_server(flood_rate=1, flood_burst=1)  # the name took the burst
    student = ChatClient(server.server_address).join("alice")
    student.send("too soon")
    student.expect("You are sending lines too fast")
    expect_console(caplog, "more line about connections from 127.0.0.1 not shown")
    assert not [line for line in console_lines(caplog) if line.startswith("Slowing down")]
    student.close()


@pytest.mark.parametrize("per_address", [30, 0], ids=["counted", "shared machine: all shown"])
def test_a_computer_that_connects_very_often_is_counted_on_the_console_not_shown(
        start_server, computer, caplog, monkeypatch, per_address):
    """A script that connects and hangs up in a loop must not bury the chat on the
    console: past CONNECTION_LINES_SHOWN lines a while, only a count; others still show.
    With --per-address 0 the class may be one address: then every line shows."""
    monkeypatch.setattr(chat_server, "CONNECTION_LINES_SECONDS", 2.0)
    monkeypatch.setattr(chat_server, "RECORDER_CHECK_SECONDS", 0.2)  # how soon it counts
    monkeypatch.setattr(chat_server, "CONNECTION_LINES_SHOWN", 10)
    server = start_server(per_address=per_address)
    started = time.monotonic()
    for _ in range(30):
        computer(2, server).close()  # "Accepted new client", then "Closed connection"
    computer(3, server)  # another student, in the middle of it
    expect_console(caplog, "Accepted new client: 127.0.0.3")
    wait_until(lambda: server.places_taken() == 1, message="the 30 to be closed")
    wait_until(lambda: sum(connection_lines_from("127.0.0.2", caplog)) == 60,
               message="every line shown or counted")
    shown, counted = connection_lines_from("127.0.0.2", caplog)
    if per_address:
        whiles = int((time.monotonic() - started) / 2.0) + 1  # each 2 s long
        assert counted > 0 and shown <= 10 * whiles
    else:
        assert (shown, counted) == (60, 0)


def fetch_the_page(server):
    """Load the chat page from 127.0.0.1, as a browser does."""
    with socket.create_connection(server.server_address[:2], timeout=TIMEOUT) as browser:
        browser.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert browser.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_only_the_computer_that_got_the_page_has_its_greeting_held_for_a_spare(
        server, computer):
    """See Addresses.may_be_spare(): another computer is greeted at once."""
    fetch_the_page(server)
    assert server.addresses.may_be_spare("127.0.0.1")
    computer(2, server).expect("*** Welcome to the chat!",
                               timeout=4 * chat_server.BROWSER_WAIT_SECONDS)


def test_enter_on_a_silent_screen_after_the_page_is_not_taken_for_the_password(
        start_server, quick_passwords):
    """nc started just after this computer loaded the page sees nothing (it may be the
    browser's spare connection) until Enter: that Enter is no wrong password."""
    server = start_server(password="fish")
    fetch_the_page(server)
    student = ChatClient(server.server_address)
    student.send("")  # Enter on a blank screen
    student.expect("Password?")
    student.send("fish")
    student.expect("What is your name?")
    assert server.addresses.password_wait("127.0.0.1") == 0
    student.close()


def test_a_spare_connection_never_used_is_closed_at_the_name_timeout_without_a_word(
        start_server):
    server = start_server(name_timeout=0.5)
    fetch_the_page(server)
    with socket.create_connection(server.server_address[:2], timeout=TIMEOUT) as spare:
        assert spare.recv(1024) == b""  # closed, with no greeting and no goodbye


def test_with_per_address_0_a_connection_a_second_after_the_page_is_greeted_at_once(
        start_server):
    """The whole class may be one address then: only a connection in the
    second after the page (when a browser opens its spares) waits for Enter."""
    server = start_server(per_address=0)
    fetch_the_page(server)
    assert server.addresses.may_be_spare("127.0.0.1")  # a browser's spare, maybe
    later = time.monotonic() + chat_server.SHARED_SPARE_SECONDS
    server.addresses.clock = lambda: later
    assert not server.addresses.may_be_spare("127.0.0.1")
    student = ChatClient(server.server_address)
    student.expect("*** Welcome to the chat!")
    student.close()


def test_shared_machine_mode_lets_one_address_open_many_connections(start_server, computer):
    server = start_server(per_address=0, max_clients=20)
    clients = [computer(2, server) for _ in range(12)]  # past the default of 8
    for client in clients:
        client.expect("What is your name?")


def test_every_client_refused_from_a_full_room_reads_why(start_server, computer):
    """45 clients send a name at once to a room of 5: the other 40 each read the reason."""
    server = start_server(max_clients=5, per_address=0)
    clients = []
    for number in range(45):
        client = computer(2, server)
        client.send("s%d" % number)  # at once, before any prompt: as a script does
        clients.append(client)
    admitted = refused = 0
    for client in clients:
        first = client.read_line()
        if first == "*** Welcome to the chat!":
            admitted += 1
            continue
        assert first == "*** The room is full (5 connected). Try again later."
        assert read_until_closed(client) == []  # then a clean end, no reset
        refused += 1
    assert (admitted, refused) == (5, 40)


# Not strict: the resets come only when the accept loop gets REFUSALS_AT_ONCE
# ahead of the refuser thread, which depends on how busy the machine is.
def test_every_client_refused_in_a_flood_reads_why_and_a_clean_end(start_server, computer):
    """150 clients send a name at once to a room of 5: all 145 refused read the
    reason, then the end of the stream, not a reset."""
    server = start_server(max_clients=5, per_address=0)
    clients = []
    for number in range(150):
        client = computer(2, server)
        client.send("s%d" % number)
        clients.append(client)
    outcomes = collections.Counter()
    for client in clients:
        try:
            lines = [client.read_line()]
            if lines[0] != "*** Welcome to the chat!":
                lines += read_until_closed(client)
        except ConnectionResetError:
            lines.append("(reset)")
        outcomes[" / ".join(map(str, lines))] += 1
    assert outcomes == {"*** Welcome to the chat!": 5,
                        "*** The room is full (5 connected). Try again later.": 145}


def test_a_refused_browser_gets_a_503_page_with_the_reason(start_server, computer):
    server = start_server(max_clients=1)
    computer(2, server).expect("What is your name?")
    browser = computer(3, server)
    browser.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    lines = read_until_closed(browser)
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "The room is full (1 connected). Try again later." in lines[-1]


def test_a_refused_browser_whose_request_comes_in_two_reads_gets_the_503_page(
        start_server, computer, monkeypatch):
    """The refuser answers the whole request head it read, not only its last piece."""
    monkeypatch.setattr(chat_server, "BROWSER_WAIT_SECONDS", 2.0)  # room for the second piece
    read = []  # what the refuser has read so far, each time it looks
    looks_like_http = chat_server.looks_like_http
    monkeypatch.setattr(chat_server, "looks_like_http",
                        lambda data: read.append(bytes(data)) or looks_like_http(data))
    server = start_server(max_clients=1)
    computer(2, server).join("alice")  # speaks first: no wait for a browser
    browser = computer(3, server)
    browser.send_raw(b"GET / HTTP/1.1\r\n")
    wait_until(lambda: b"GET / HTTP/1.1\r\n" in read,
               message="the refuser to read the first piece")
    browser.send_raw(b"Host: 127.0.0.1\r\n\r\n")
    lines = read_until_closed(browser)
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "The room is full (1 connected). Try again later." in lines[-1]


def test_a_refused_websocket_gets_the_reason_as_a_message_and_a_close(start_server, computer):
    server = start_server(max_clients=1)
    computer(2, server).expect("What is your name?")
    page = ChatSocket(*server.server_address[:2])
    try:
        assert page.expect_closed() == ["*** The room is full (1 connected). Try again later."]
        assert page.closed_with is not None and page.closed_with[0] == 1000
    finally:
        page.shutdown()


# --- One computer, one spelling of its address ---------------------------------

@pytest.mark.parametrize("spelling, normal", [
    ("127.0.0.1", "127.0.0.1"), ("::1", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"),
    ("::ffff:10.0.0.5", "10.0.0.5"), ("2001:DB8::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
])
def test_every_spelling_of_an_address_counts_as_one_computer(spelling, normal):
    assert normal_host(spelling) == normal


def ipv6_server(start_server_at, **settings):
    """A server on [::] that IPv4 and ::1 clients both reach, or skip."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = start_server_at("::", **settings)
        probe = ChatClient(("::1", server.server_address[1]))
    except OSError as error:
        pytest.skip("no IPv6 loopback here: %s" % error)
    probe.expect("What is your name?")  # admitted, so counted until it is gone
    probe.close()
    wait_until(lambda: server.places_taken() == 0, message="the probe to be gone")
    return server


def test_kicked_over_ipv4_cannot_rejoin_over_ipv6_loopback(start_server_at):
    server = ipv6_server(start_server_at)
    port = server.server_address[1]
    console = TeacherConsole(server, stream=None)
    bob = ChatClient(("127.0.0.1", port)).join("bob")  # seen as ::ffff:127.0.0.1
    try:
        console.handle_line("/kick bob")
        bob.expect_closed()
        wait_until(lambda: server.places_taken() == 0, message="bob gone")
        again = ChatClient(("::1", port))
        assert read_until_closed(again) == [
            "*** You were removed by the teacher. Try again in 5 minutes."]
        again.close()
        console.handle_line("/unban ::ffff:127.0.0.1")  # another spelling, same computer
        back = ChatClient(("::1", port))
        back.expect("What is your name?")
        back.close()
    finally:
        bob.close()


def test_per_address_limit_counts_ipv4_and_ipv6_loopback_as_one(start_server_at):
    server = ipv6_server(start_server_at, per_address=1)
    port = server.server_address[1]
    first = ChatClient(("127.0.0.1", port))
    try:
        first.expect("What is your name?")
        second = ChatClient(("::1", port))
        assert read_until_closed(second) == [
            "*** Too many connections from your computer (1). Close one, then try again."]
        second.close()
    finally:
        first.close()


# --- Join and leave spam --------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_joins_from_one_address_are_instant_for_a_burst_then_paced():
    clock = FakeClock()
    addresses = Addresses(Settings(per_address=2), clock)
    burst = chat_server.JOINS_PER_MINUTE * 2
    assert [addresses.join_delay("10.0.0.2") for _ in range(burst)] == [0.0] * burst
    assert addresses.join_delay("10.0.0.2") == pytest.approx(60 / burst)
    assert addresses.join_delay("10.0.0.3") == 0.0  # another computer is not paced
    clock.now += 60  # a minute later, the burst is back
    assert addresses.join_delay("10.0.0.2") == 0.0


def test_shared_machine_mode_never_paces_joins():
    addresses = Addresses(Settings(per_address=0), FakeClock())
    assert all(addresses.join_delay("10.0.0.2") == 0.0 for _ in range(1000))


def test_join_spam_from_one_address_waits_and_is_told_so(start_server, computer, monkeypatch):
    # 20 a minute x per_address 2: a burst of 40 joins, then one each 1.5 s.
    monkeypatch.setattr(chat_server, "JOINS_PER_MINUTE", 20)
    server = start_server(per_address=2)
    started = time.monotonic()
    for number in range(40):  # the burst: each joins at once, nothing said
        bot = computer(2, server).join("bot%d" % number)
        assert not any("Many people joined" in line for line in bot.seen)
        bot.send("/quit")
        bot.expect_closed()
        wait_until(lambda: server.places_taken() == 0, message="the bot gone")
    late = computer(2, server)
    late.send("late")
    told = late.expect("*** Many people joined")
    assert re.match(r"\*\*\* Many people joined from your computer just now: you join in "
                    r"\d+ seconds?\.$", told)
    other = computer(3, server).join("other")  # another computer joins at once meanwhile
    assert other.seen[-1] == "*** Online now (1): other"
    late.expect("*** Welcome, late!")
    # The 41st join came at least 1.5 s after the first: the pace, whatever the speed.
    assert time.monotonic() - started >= 1.5 * 0.9


# --- Quit reasons and renames under mute and quiet ------------------------------

def test_quit_reason_is_cut_to_its_cap(room):
    alice, bob = room("alice", "bob")
    bob.send("/quit " + "x" * 500)
    line = alice.expect_next("*** bob left the chat.")
    assert line == "*** bob left the chat. (%s)" % ("x" * chat_server.MAX_QUIT_REASON_CHARS)


@pytest.mark.parametrize("filler", ["\u3000", "\u3164", "\u2800"],
                         ids=["ideographic space", "Hangul filler", "braille blank"])
def test_quit_reason_cannot_be_padded_to_wrap_the_servers_line(room, filler):
    alice, bob = room("alice", "bob")
    bob.send("/quit bye" + filler * 30 + "[teacher] go home")
    alice.expect_next("*** bob left the chat. (bye [teacher] go home)")


def test_quit_reason_of_a_muted_student_is_not_shown(room, console):
    alice, bob = room("alice", "bob")
    console.handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    bob.send("/quit buy cheap stuff at example.com")
    assert alice.expect_next("*** bob left the chat") == "*** bob left the chat."


def test_quit_reason_is_not_shown_in_quiet_mode(room, console):
    alice, bob = room("alice", "bob")
    console.handle_line("/quiet on")
    bob.expect_next("*** [teacher] Quiet, please")
    alice.expect_next("*** [teacher] Quiet, please")
    bob.send("/quit buy cheap stuff at example.com")
    assert alice.expect_next("*** bob left the chat") == "*** bob left the chat."


def test_a_muted_students_burst_costs_the_room_nothing(start_server, room):
    # A room of 4000 bytes a second with a 2 KiB burst: 10 KB would cost 2 s.
    server = start_server(room_rate=4000, sendq=4096)
    alice, bob, carol = room("alice", "bob", "carol", target=server)
    TeacherConsole(server, stream=None).handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    started = time.monotonic()
    bob.send_raw(b"".join(b"spam %d %s\r\n" % (n, b"x" * 990) for n in range(10)))
    bob.send("/who")
    carol.send("hi")
    alice.expect_next("carol says: hi")
    bob.expect("*** Not sent: the teacher has muted you.")
    bob.expect("*** Online now")  # all of bob's lines were handled
    assert time.monotonic() - started < 1.0  # waiting for the budget: 2 s


def test_muted_student_cannot_rename_and_is_told_why(room, console):
    alice, bob = room("alice", "bob")
    console.handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    bob.send("/nick bobby")
    bob.expect_next("*** You cannot change your name while the teacher has muted you.")
    console.handle_line("sentinel")
    alice.expect_next("*** [teacher] sentinel")  # no rename line came before it


def test_nobody_can_rename_in_quiet_mode(room, console):
    alice, bob = room("alice", "bob")
    console.handle_line("/quiet on")
    bob.expect_next("*** [teacher] Quiet, please")
    alice.expect_next("*** [teacher] Quiet, please")
    bob.send("/nick bobby")
    bob.expect_next("*** You cannot change your name while the room is quiet.")
    console.handle_line("sentinel")
    alice.expect_next("*** [teacher] sentinel")  # no rename line came before it


def test_joins_and_leaves_still_go_out_in_quiet_mode(room, joined, console):
    (alice,) = room("alice")
    console.handle_line("/quiet on")
    alice.expect_next("*** [teacher] Quiet, please")
    bob = joined("bob")
    alice.expect_next("*** bob joined the chat.")
    bob.close()
    alice.expect_next("*** bob left the chat.")


# --- Everything a connection sends is paced -------------------------------------

def test_telnet_nops_are_paced_by_the_input_budget(start_server, room, monkeypatch):
    """8 KiB that are no line at all (telnet NOPs) cost time like any input."""
    monkeypatch.setattr(chat_server, "INPUT_BURST_BYTES", 4 * 1024)  # a quarter second's worth
    server = start_server()
    alice, bob, carol = room("alice", "bob", "carol", target=server)
    nops = bytes([chat_server.IAC, 241]) * (4 * 1024)
    bob.sock.settimeout(TIMEOUT)
    started = time.monotonic()
    bob.send_raw(nops + b"sentinel\r\n")
    carol.send("meanwhile")  # another pair chats on, unhindered
    alice.expect_next("carol says: meanwhile", timeout=1.0)
    alice.expect_next("bob says: sentinel")
    took = time.monotonic() - started
    least = (len(nops) - chat_server.INPUT_BURST_BYTES) / chat_server.INPUT_BYTES_PER_SECOND
    assert took >= least * 0.9, "the server read %d bytes in %.2f s" % (len(nops), took)


def test_flood_rate_zero_turns_the_input_budget_off(start_server, room):
    server = start_server(flood_rate=0)
    alice, bob = room("alice", "bob", target=server)
    bob.sock.settimeout(TIMEOUT)
    started = time.monotonic()
    bob.send_raw(bytes([chat_server.IAC, 241]) * (48 * 1024) + b"sentinel\r\n")
    alice.expect_next("bob says: sentinel")
    assert time.monotonic() - started < 1.5  # paced, it would take 2 s at least


@pytest.mark.parametrize("junk", [b"\r\n" * 100 + b"x\r\n", b" \t \r\n" * 100 + b"x\r\n",
                                  b"y" * 100 + b"\r\n"],
                         ids=["blank", "spaces", "too long"])
def test_lines_that_say_nothing_are_paced_like_messages(start_server, room, junk):
    """A run of blank lines is paced as one line (see pace_flood())."""
    server = start_server(flood_rate=100, flood_burst=5, max_line=64)
    alice, bob = room("alice", "bob", target=server)
    started = time.monotonic()
    bob.send_raw(junk * 30 + b"sentinel\r\n")
    alice.expect("bob says: sentinel")
    assert time.monotonic() - started >= (31 - 5) / 100 * 0.9


def test_a_student_who_sends_thousands_of_blank_lines_and_closes_leaves_at_once(room):
    """Paced one by one, 4,000 blank lines would keep bob in the room for 13 minutes."""
    alice, bob = room("alice", "bob")
    bob.send_raw(b"\n" * 4000)
    bob.close()
    alice.expect_next("*** bob left the chat.")


def test_a_connection_sending_blank_lines_is_still_closed_at_the_name_timeout(
        start_server, connect):
    server = start_server(name_timeout=1)
    spare = connect(server)
    spare.expect("What is your name?")
    spare.send_raw(b"\n" * 4000)  # lines waiting, so the read never times out
    spare.expect("*** You did not give a name in time. Goodbye.")


def test_names_sent_before_joining_are_paced(start_server, connect):
    server = start_server(flood_rate=100, flood_burst=5)
    bot = connect(server)
    started = time.monotonic()
    bot.send_raw(b"!\r\n" * 30 + b"bot\r\n")  # 30 names refused, then one taken
    bot.expect("*** Welcome, bot!")
    assert time.monotonic() - started >= (31 - 5) / 100 * 0.9


# --- A room-wide budget: no reader is dropped by what others send ----------------

READER_BYTES_PER_SECOND = 64 * 1024  # SPEC: a slow school laptop
# The reader and the room's budget both run this many times faster than the
# defaults: the same ratio between them (the proof), in a fraction of the time.
BURST_SPEED_UP = 4
SENDERS = 6  # 60 KB at once: nearly four outboxes of 16 KiB
BURST_LINE = "z" * 990  # a 1 KB line, with the name and " says: "


def burst_test(start_server, computer, caplog, make_lines, room_rate=None):
    """SENDERS students on other computers each send one whole flood burst of
    ~1 KB lines at the same moment; a victim reading at 64 KiB/s through a small
    receive buffer must get every line and never be dropped (rates BURST_SPEED_UP
    times those)."""
    # A small outbox (16 KiB, of which the room's burst is half): the room's
    # budget, not a big buffer, is what must keep the victim in.
    settings = dict(sendq=16 * 1024, max_clients=SENDERS + 2, per_address=2,
                    room_rate=chat_server.ROOM_BYTES_PER_SECOND * BURST_SPEED_UP)
    if room_rate is not None:
        settings["room_rate"] = room_rate
    server = start_server(**settings)
    burst = server.settings.flood_burst
    victim = computer(2, server, rcvbuf=4096).join("victim")
    senders = [computer(10 + n, server).join("s%d" % n) for n in range(SENDERS)]
    drain = Drain(senders)  # the senders read what the others say, quickly
    drain.start()
    wanted = SENDERS * burst
    reader = RateReader(victim, READER_BYTES_PER_SECOND * BURST_SPEED_UP, BURST_LINE[:20],
                        wanted, timeout=12.0)
    try:
        data = [b"".join(line.encode("utf-8") + b"\r\n" for line in make_lines(n, burst))
                for n in range(SENDERS)]
        reader.start()
        for sender, chunk in zip(senders, data):  # all at once
            sender.send_raw(chunk)
        reader.join(15.0)
    finally:
        drain.stop()
    got = [line for line in reader.lines if BURST_LINE[:20] in line]
    assert not reader.closed, "the victim was disconnected after %d lines" % len(got)
    assert not [l for l in console_lines(caplog) if "Disconnecting victim" in l]
    assert len(got) == wanted, "the victim got %d of %d lines" % (len(got), wanted)
    for n in range(SENDERS):  # in each sender's order
        mine = [line for line in got if line.startswith("s%d " % n)]
        assert [line.split()[-1] for line in mine] == [
            "%s-%d" % (BURST_LINE, k) for k in range(burst)]


def test_worst_burst_of_messages_never_drops_a_reader_at_64_kib_per_second(
        start_server, computer, caplog):
    burst_test(start_server, computer, caplog,
               lambda n, burst: ["%s-%d" % (BURST_LINE, k) for k in range(burst)])


def test_worst_burst_of_whispers_never_drops_a_reader_at_64_kib_per_second(
        start_server, computer, caplog):
    burst_test(start_server, computer, caplog,
               lambda n, burst: ["/msg victim %s-%d" % (BURST_LINE, k) for k in range(burst)])


def test_one_computer_flooding_does_not_hold_back_everyone_elses_lines(
        start_server, computer):
    """Six connections from one computer flood long lines, far past the room's
    budget. Its share of the budget holds them back, not the room's: carol's
    lines, from another computer, still go out at once all along."""
    # 2,000 bytes a second; bursts of 32 KiB for the room, 8 KiB for one computer.
    server = start_server(room_rate=2000, sendq=64 * 1024)
    reader = computer(4, server).join("reader")
    carol = computer(3, server).join("carol")
    flooders = [computer(2, server).join("f%d" % n) for n in range(6)]
    for flooder in flooders:  # 126 KB, paced by each one's flood limit over 4 s
        flooder.send_raw(("%s\r\n" % ("w" * 690)).encode() * 30)
    reader.expect("says: www")  # the flood has begun
    waits = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and len(waits) < 15:
        started = time.monotonic()
        carol.send("question %d" % len(waits))
        reader.expect("carol says: question %d" % len(waits), timeout=TIMEOUT + 10)
        waits.append(time.monotonic() - started)
    # Sharing the room's budget with the flood, they would wait seconds.
    assert max(waits) < 1.0, waits


# --- Password guessing -----------------------------------------------------------

@pytest.fixture
def quick_passwords(monkeypatch):
    """Answers after 0.1 s, waits from 0.25 s: the same rules, in test time."""
    monkeypatch.setattr(chat_server, "PASSWORD_ANSWER_SECONDS", 0.1)
    monkeypatch.setattr(chat_server, "PASSWORD_WAIT_SECONDS", 0.25)


@pytest.mark.parametrize("answer, reply", [("s3cret", "*** What is your name?"),
                                           ("guess", "*** Wrong password. Goodbye.")])
def test_right_and_wrong_passwords_are_answered_after_the_same_delay(
        start_server, computer, quick_passwords, answer, reply):
    server = start_server(password="s3cret")
    client = computer(2, server)
    client.expect("Password?")
    started = time.monotonic()
    client.send(answer)
    client.expect_next(reply)
    assert time.monotonic() - started >= chat_server.PASSWORD_ANSWER_SECONDS * 0.9


def test_wrong_passwords_past_the_free_ones_make_the_address_wait(
        start_server, computer, quick_passwords, monkeypatch):
    monkeypatch.setattr(chat_server, "PASSWORD_FAILURES_FREE", 1)  # x per_address 2: 2 free
    server = start_server(password="s3cret", per_address=2)
    guessers = [computer(2, server), computer(2, server)]
    for guesser in guessers:
        guesser.expect("Password?")
        guesser.send("guess")
    for guesser in guessers:
        assert read_until_closed(guesser) == ["*** Wrong password. Goodbye."]
    assert server.addresses.password_wait("127.0.0.2") == 0  # two were free
    # Closed on the client's side a moment before the server counts them gone:
    # a third connection sooner is one too many from that computer.
    wait_until(lambda: server.places_taken() == 0, message="the guessers to be gone")
    third = computer(2, server)
    third.expect("Password?")
    third.send("guess")
    third.expect("*** Wrong password. Goodbye.")
    blocked = computer(2, server)
    lines = read_until_closed(blocked)
    assert lines[-1] == "*** Too many wrong passwords from your computer. Try again in 1 second."
    assert not any("Password?" in line for line in lines)  # not even asked
    computer(3, server).expect("Password?")  # another computer is not held up
    wait_until(lambda: server.addresses.password_wait("127.0.0.2") == 0, timeout=TIMEOUT,
               message="the wait to pass")
    again = computer(2, server)
    again.expect("Password?")  # asked again: slowed down, never locked out
    again.send("guess")
    again.expect("*** Wrong password. Goodbye.")
    doubled = 2 * chat_server.PASSWORD_WAIT_SECONDS  # the second wait: twice the first
    assert doubled - 0.25 < server.addresses.password_wait("127.0.0.2") <= doubled


def test_password_waits_double_up_to_a_maximum_and_a_right_one_clears_them():
    clock = FakeClock()
    addresses = Addresses(Settings(per_address=1), clock)
    waits = []
    for _ in range(chat_server.PASSWORD_FAILURES_FREE + 8):
        addresses.password_failed("10.0.0.2")
        waits.append(addresses.password_wait("10.0.0.2"))
    free = chat_server.PASSWORD_FAILURES_FREE
    first = chat_server.PASSWORD_WAIT_SECONDS
    assert waits[:free] == [0.0] * free
    assert waits[free:free + 3] == [first, 2 * first, 4 * first]
    assert max(waits) == chat_server.PASSWORD_WAIT_MAX_SECONDS
    assert addresses.password_wait("10.0.0.3") == 0.0
    addresses.password_passed("10.0.0.2")
    assert addresses.password_wait("10.0.0.2") == 0.0


def test_what_the_room_knows_of_past_addresses_is_forgotten_once_it_limits_no_one():
    """Over a long day every address of a lab joins, guesses, is banned: a sweep (on a
    later connection) forgets what no longer matters, and keeps what still does."""
    clock = FakeClock()
    addresses = Addresses(Settings(per_address=1), clock)
    for number in range(50):
        host = "10.0.1.%d" % number
        assert addresses.connect(host)
        addresses.join_delay(host)
        addresses.password_failed(host)
        addresses.ban(host, "student%d" % number, 1)
        addresses.disconnect(host)
    clock.now += chat_server.PASSWORD_FAILURES_KEPT_SECONDS + chat_server.ADDRESSES_SWEEP_SECONDS
    for _ in range(chat_server.PASSWORD_FAILURES_FREE + 1):
        addresses.password_failed("10.0.9.9")  # guessing right now: must go on waiting
    addresses.join_delay("10.0.8.8")  # joined just now: its bucket is not full
    assert addresses.connect("10.0.2.1")  # the sweep runs here
    assert list(addresses._joins) == ["10.0.8.8"] and addresses._bans == {}
    assert list(addresses._failures) == ["10.0.9.9"]
    assert addresses.password_wait("10.0.9.9") == chat_server.PASSWORD_WAIT_SECONDS
    # A guesser who pauses past the longest wait keeps its count: no free tries again.
    clock.now += 2 * chat_server.PASSWORD_WAIT_MAX_SECONDS + chat_server.ADDRESSES_SWEEP_SECONDS
    assert addresses.connect("10.0.2.2")  # another sweep
    assert list(addresses._failures) == ["10.0.9.9"]


def test_shared_machine_mode_never_makes_an_address_wait_for_passwords():
    addresses = Addresses(Settings(per_address=0), FakeClock())
    for _ in range(100):
        addresses.password_failed("10.0.0.2")
    assert addresses.password_wait("10.0.0.2") == 0.0


# --- The teacher's tools stick --------------------------------------------------

def test_kick_disconnects_the_student_and_every_unjoined_connection_from_there(
        server, computer, crowd, console, caplog):
    alice, bob = crowd(server, (3, "alice"), (2, "bob"))
    lurkers = [computer(2, server) for _ in range(3)]
    for lurker in lurkers:
        lurker.expect("What is your name?")
    elsewhere = computer(4, server)
    elsewhere.expect("What is your name?")
    console.handle_line("/kick bob")
    assert read_until_closed(bob) == ["*** The teacher removed you from the chat."]
    for lurker in lurkers:
        assert read_until_closed(lurker) == [
            "*** The teacher closed the connections from your computer."]
    alice.expect_next("*** bob left the chat.")
    expect_console(caplog, "Kicked bob; 127.0.0.2 may not rejoin for 5 minutes "
                   "(/unban bob lifts it). Also closed 3 connections from it")
    assert read_until_closed(computer(2, server)) == [
        "*** You were removed by the teacher. Try again in 5 minutes."]
    elsewhere.send("carol")  # another computer's connection was left alone
    elsewhere.expect("*** Welcome, carol!")


def test_kick_does_not_ban_an_address_another_student_shares(server, computer, crowd,
                                                              console, caplog):
    bob, carol = crowd(server, (2, "bob"), (2, "carol"))
    console.handle_line("/kick bob")
    bob.expect_closed()
    carol.expect_next("*** bob left the chat.")
    expect_console(caplog, "127.0.0.2 is not banned: carol joined from it too. "
                   "/ban 127.0.0.2 disconnects everyone there and bans it.")
    computer(2, server).join("bob")  # not banned: bob may come back
    carol.expect_next("*** bob joined the chat.")


def test_a_connection_asking_a_name_when_the_ban_came_cannot_join(server, computer):
    """A connection accepted just before the ban (a race /kick cannot see) stays out."""
    late = computer(2, server)
    late.expect("What is your name?")
    server.addresses.ban("127.0.0.2", "bob", 5)  # what /kick and /ban do
    late.send("bob")
    assert read_until_closed(late) == ["*** You were removed by the teacher. Goodbye."]


def test_ban_disconnects_everyone_at_an_address_and_bans_it(server, computer, crowd,
                                                            console, caplog):
    alice, bob, carol = crowd(server, (3, "alice"), (2, "bob"), (2, "carol"))
    lurker = computer(2, server)
    lurker.expect("What is your name?")
    console.handle_line("/ban 127.0.0.2")
    for student in (bob, carol):
        assert read_until_closed(student)[-1] == (
            "*** The teacher removed everyone at your computer from the chat.")
    assert read_until_closed(lurker) == [
        "*** The teacher closed the connections from your computer."]
    line = expect_console(caplog, "Disconnected 2 students and")
    assert line.endswith("from 127.0.0.2; banned for 5 minutes.")
    assert read_until_closed(computer(2, server))[-1].startswith(
        "*** You were removed by the teacher.")
    assert sorted([alice.read_line(), alice.read_line()]) == [
        "*** bob left the chat.", "*** carol left the chat."]
    dave = computer(4, server).join("dave")
    alice.expect_next("*** dave joined the chat.")  # alice's computer was not touched
    dave.send("hi")
    alice.expect_next("dave says: hi")


@pytest.mark.parametrize("typed", ["::1", "[::1]:51234", "127.0.0.1:51234"],
                         ids=["IPv6", "IPv6 with a port", "with a port, as /who shows it"])
def test_ban_takes_any_spelling_of_an_address(server, joined, console, typed):
    """::1 is this computer's 127.0.0.1; /who shows it with a connection's port,
    and a teacher copies that: the ban finds alice there."""
    alice = joined("alice")
    console.handle_line("/ban " + typed)
    assert alice.expect_closed() == [
        "*** The teacher removed everyone at your computer from the chat."]


# Not strict: whether the removed students are counted again depends on whether
# their reader threads have finished (unregistered) before close_waiting() looks.
def test_ban_tells_the_teacher_how_many_it_disconnected(server, computer, crowd, console,
                                                        caplog):
    crowd(server, (2, "bob"), (2, "carol"))
    computer(2, server).expect("What is your name?")
    console.handle_line("/ban 127.0.0.2")
    line = expect_console(caplog, "Disconnected 2 students and")
    assert line == "Disconnected 2 students and 1 connection from 127.0.0.2; banned for " \
        "5 minutes."


@pytest.mark.parametrize("lift", ["bob", "BOB", "127.0.0.2", "::ffff:127.0.0.2",
                                  "127.0.0.2:51234"])
def test_unban_takes_the_name_or_any_spelling_of_the_address(server, computer, console,
                                                             caplog, lift):
    bob = computer(2, server).join("bob")
    console.handle_line("/kick bob")
    bob.expect_closed()
    assert read_until_closed(computer(2, server))[-1].startswith(
        "*** You were removed by the teacher.")
    console.handle_line("/unban " + lift)
    expect_console(caplog, "127.0.0.2 may join again.")
    computer(2, server).join("bob")


def test_console_who_shows_connections_that_have_not_joined(server, computer, console,
                                                            caplog):
    computer(3, server).join("alice")
    waiting = [computer(2, server), computer(2, server), computer(4, server)]
    for client in waiting:
        client.expect("What is your name?")
    console.handle_line("/who")
    expect_console(caplog, "1 online, 3 not joined yet.")
    expect_console(caplog, "Not joined yet: 127.0.0.2 (2), 127.0.0.4")


def muted_and_back_as_robert(server, crowd, console):
    """bob, alone at 127.0.0.2, is muted, leaves, and comes back as robert."""
    alice, bob = crowd(server, (3, "alice"), (2, "bob"))
    console.handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    bob.close()
    alice.expect_next("*** bob left the chat.")
    robert = crowd(server, (2, "robert"))[0]
    robert.expect_next(chat_server.MUTED_LINE)  # told at once
    alice.expect_next("*** robert joined the chat.")
    return alice, robert


def test_mute_of_a_student_alone_on_an_address_follows_any_name(server, crowd, console,
                                                                caplog):
    alice, robert = muted_and_back_as_robert(server, crowd, console)
    expect_console(caplog, "robert joined muted (/unmute robert lifts it).")
    robert.send("I am new here")
    robert.expect_next("*** Not sent: the teacher has muted you.")
    console.handle_line("/unmute robert")
    robert.expect_next("*** The teacher has unmuted you")
    robert.send("thanks")
    alice.expect_next("robert says: thanks")


def test_unmute_by_the_muted_name_reaches_the_student_under_a_new_name(server, crowd,
                                                                       console, caplog):
    alice, robert = muted_and_back_as_robert(server, crowd, console)
    console.handle_line("/unmute bob")
    expect_console(caplog, "bob is no longer muted.")
    robert.send("thanks")
    robert.send("/who")
    start = len(robert.seen)
    robert.expect("*** Online now")  # every line before it was handled
    assert not any("Not sent" in line for line in robert.seen[start:]), robert.seen[start:]
    alice.expect_next("robert says: thanks")


def test_private_messages_from_one_computer_share_one_pace(start_server, crowd, caplog):
    """Eight connections at the flood limit each would bury one classmate's page
    under forty private lines a second, which the teacher never sees."""
    server = start_server(flood_rate=2, flood_burst=2)  # 2 at once, then one each 0.5 s
    server.addresses.clock = lambda: 0.0  # the computer's allowance does not refill
    alice, w1, w2, w3 = crowd(server, (3, "alice"), (2, "w1"), (2, "w2"), (2, "w3"))
    w1.send("/msg alice one")
    alice.expect_next("w1 whispers: one")
    w2.send("/msg alice two")
    alice.expect_next("w2 whispers: two")
    w3.send("/msg alice three")  # its own connection's first line, but its computer's third
    w3.expect_next("*** Your computer is sending private messages too fast")
    alice.expect_next("w3 whispers: three")  # late, not lost
    w1.send("/msg alice four")
    w1.expect("*** Your computer is sending private messages too fast")
    alice.expect_next("w1 whispers: four")
    assert [line for line in console_lines(caplog) if "Slowing down private" in line] == [
        "Slowing down private messages from 127.0.0.2: too many from its connections "
        "together (w3, to alice, was the first)"]  # once for the computer


def test_private_messages_from_another_computer_keep_their_own_pace(start_server, crowd):
    server = start_server(flood_rate=0.5, flood_burst=2)
    server.addresses.clock = lambda: 0.0  # allowances do not refill
    alice, w1, w2, bob = crowd(server, (3, "alice"), (2, "w1"), (2, "w2"), (4, "bob"))
    w1.send("/msg alice one")
    alice.expect_next("w1 whispers: one")
    w2.send("/msg alice two")
    alice.expect_next("w2 whispers: two")  # computer 2 has used its allowance
    bob.send("/msg alice hi")
    bob.expect_next("*** You whispered to alice: hi")  # not told to slow down first


def test_lines_from_one_computer_share_one_pace(start_server, crowd, caplog):
    """Eight connections, each at the flood limit, would bury the room under
    forty lines a second: a computer's connections share twice one's pace."""
    server = start_server(flood_rate=2, flood_burst=2)  # a computer: 4 at once, then 4/s
    server.addresses.clock = lambda: 0.0  # the computer's allowance does not refill
    alice, w1, w2, w3 = crowd(server, (3, "alice"), (2, "w1"), (2, "w2"), (2, "w3"))
    for sender in (w1, w2):
        sender.send("one")
        sender.send("two")
    for _ in range(4):
        alice.expect("says:")
    w3.send("three")  # its own connection's first line, but its computer's fifth
    w3.expect("*** Your computer is sending lines too fast")  # after w1's and w2's
    alice.expect_next("w3 says: three")  # late, not lost
    assert [line for line in console_lines(caplog) if "Slowing down 127" in line] == [
        "Slowing down 127.0.0.2: too many lines from its connections together "
        "(w3 was the first)"]


def test_a_private_message_does_not_count_toward_its_computers_room_lines(
        start_server, crowd):
    """Private messages have a pace of their own (see the test above): a /msg
    must not use up the lines its computer may say to the room."""
    server = start_server(flood_rate=1, flood_burst=1)  # a computer: 2 room lines at once
    server.addresses.clock = lambda: 0.0
    alice, w1, w2 = crowd(server, (3, "alice"), (2, "w1"), (2, "w2"))
    w1.send("/msg alice psst")
    alice.expect_next("w1 whispers: psst")
    w2.send("one")
    alice.expect_next("w2 says: one")
    w1.send("two")
    alice.expect_next("w1 says: two")
    w2.send("/who")
    w2.expect("*** Online now")
    assert not [line for line in w1.seen + w2.seen if "Your computer" in line]


def test_lines_from_another_computer_keep_their_own_pace(start_server, crowd):
    server = start_server(flood_rate=1, flood_burst=1)  # a computer: 2 at once
    server.addresses.clock = lambda: 0.0
    alice, w1, w2, bob = crowd(server, (3, "alice"), (2, "w1"), (2, "w2"), (4, "bob"))
    w1.send("one")
    alice.expect_next("w1 says: one")
    w2.send("two")
    alice.expect_next("w2 says: two")  # computer 2 has used its allowance
    bob.send("hi")
    alice.expect_next("bob says: hi")
    bob.send("/who")
    bob.expect("*** Online now")
    assert not [line for line in bob.seen if "Your computer" in line], bob.seen


def muted_and_gone_from_a_shared_computer(server, crowd, console):
    """bob, sharing 127.0.0.2 with carol, is muted and leaves; return alice, carol."""
    alice, bob, carol = crowd(server, (3, "alice"), (2, "bob"), (2, "carol"))
    console.handle_line("/mute bob")
    bob.close()
    alice.expect_next("*** bob left the chat.")
    return alice, carol


def test_a_muted_name_gone_from_a_shared_address_is_muted_under_a_new_name_from_it(
        server, computer, crowd, console, caplog):
    """A student with a second name online must not shake off a mute by rejoining
    under a third; the classmate who shared the computer stays free."""
    alice, carol = muted_and_gone_from_a_shared_computer(server, crowd, console)
    expect_console(caplog, "under any name but carol's (who shares the address)")
    bobby = computer(2, server).join("bobby")
    bobby.expect_next(chat_server.MUTED_LINE)
    alice.expect_next("*** bobby joined the chat.")
    bobby.send("still here")
    bobby.expect_next("*** Not sent: the teacher has muted you.")
    carol.close()
    alice.expect_next("*** carol left the chat.")
    carol = computer(2, server).join("carol")
    alice.expect_next("*** carol joined the chat.")
    carol.send("back again")
    alice.expect_next("carol says: back again")


def test_unmuting_a_student_taken_for_a_muted_name_lets_them_go_for_good(
        server, computer, crowd, console):
    alice, carol = muted_and_gone_from_a_shared_computer(server, crowd, console)
    dave = computer(2, server).join("dave")
    dave.expect_next(chat_server.MUTED_LINE)
    alice.expect_next("*** dave joined the chat.")
    console.handle_line("/unmute dave")
    dave.expect_next("*** The teacher has unmuted you")
    dave.close()
    alice.expect_next("*** dave left the chat.")
    dave = computer(2, server).join("dave")
    alice.expect_next("*** dave joined the chat.")
    dave.send("free")
    alice.expect_next("dave says: free")


def test_with_no_per_address_rules_a_mute_is_of_the_name_only(start_server, crowd, caplog):
    server = start_server(per_address=0)  # the whole class behind one address
    bob, = crowd(server, (2, "bob"))  # alone when muted
    TeacherConsole(server, None).handle_line("/mute bob")
    expect_console(caplog, "bob is muted, also after reconnecting from 127.0.0.2 under "
                           "that name.")
    carol, = crowd(server, (2, "carol"))
    bob.expect_next("*** The teacher has muted you")
    bob.expect_next("*** carol joined the chat.")
    carol.send("hello")
    bob.expect_next("carol says: hello")


def test_with_no_per_address_rules_a_muted_name_gone_mutes_no_other_name(
        start_server, crowd, caplog):
    server = start_server(per_address=0)  # the whole class behind one address
    alice, bob = crowd(server, (2, "alice"), (2, "bob"))
    TeacherConsole(server, None).handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    expect_console(caplog, "bob is muted, also after reconnecting from 127.0.0.2 under that "
                           "name.")
    bob.close()
    alice.expect_next("*** bob left the chat.")
    carol = crowd(server, (2, "carol"))[0]
    alice.expect_next("*** carol joined the chat.")
    carol.send("hello")
    alice.expect_next("carol says: hello")


def test_two_names_muted_at_one_computer_leave_no_name_there_free(server, computer, crowd,
                                                                  console):
    alice, bully, quiet = crowd(server, (3, "alice"), (2, "bully"), (2, "quietone"))
    console.handle_line("/mute bully")
    console.handle_line("/mute quietone")
    quiet.expect_next("*** The teacher has muted you")
    bully.close()
    alice.expect_next("*** bully left the chat.")
    quiet.close()
    alice.expect_next("*** quietone left the chat.")
    third = computer(2, server).join("bully2")
    third.expect_next(chat_server.MUTED_LINE)
    third.send("still talking")
    third.expect_next("*** Not sent: the teacher has muted you.")


def test_mute_on_a_shared_address_follows_the_name_only(server, computer, crowd, console):
    alice, bob, carol = crowd(server, (3, "alice"), (2, "bob"), (2, "carol"))
    console.handle_line("/mute bob")
    bob.expect_next("*** The teacher has muted you")
    carol.send("I share bob's computer")
    alice.expect_next("carol says: I share bob's computer")
    bob.close()
    alice.expect_next("*** bob left the chat.")
    bob = computer(2, server).join("bob")
    bob.expect_next(chat_server.MUTED_LINE)  # told at once
    alice.expect_next("*** bob joined the chat.")
    bob.send("me again")
    bob.expect_next("*** Not sent: the teacher has muted you.")
    dave = computer(2, server).join("dave")  # a new student at that computer
    alice.expect_next("*** dave joined the chat.")
    dave.send("hello")
    alice.expect_next("dave says: hello")


def test_a_classmate_who_takes_a_muted_name_takes_its_mute(
        server, computer, crowd, console, caplog):
    """bob is muted and leaves; carol, at his computer, renames herself bob:
    "bob" must not speak again (a second name was a way round the mute)."""
    alice, carol = muted_and_gone_from_a_shared_computer(server, crowd, console)
    carol.send("/nick bob")
    alice.expect_next("*** carol is now bob.")
    carol.expect("*** carol is now bob.")  # after bob's leave
    carol.expect_next(chat_server.MUTED_LINE)
    expect_console(caplog, "carol is now bob, a muted name: muted too (/unmute bob lifts it).")
    carol.send("still here")
    carol.expect_next("*** Not sent: the teacher has muted you.")
    console.handle_line("sentinel")  # an announcement: alice's next line, not carol's
    alice.expect_next("*** [teacher] sentinel")


# --- Nobody can pass for someone else ---------------------------------------------

def ask_name(client, name):
    """Send name at once (no wait for the prompt); return the server's answer to it."""
    client.send(name)
    client.expect_next("*** Welcome to the chat!")
    client.expect_next("*** You have 1 minute to give your name.")
    client.expect_next("*** What is your name?")
    return client.read_line()


INVISIBLE = "Names may not contain invisible characters."
LOOKS_LIKE_ALICE = "That name looks too much like alice, who is online."
ONE_ALPHABET = "Write a name in one alphabet"


@pytest.mark.parametrize("name, reason", [
    ("alice\u034f", INVISIBLE),  # combining grapheme joiner
    ("alice\ufe0f", INVISIBLE),  # variation selector
    ("alice\u180b", INVISIBLE),  # Mongolian free variation selector
    ("alice\u17b4", INVISIBLE),  # Khmer inherent vowel
    ("alice\u3164", INVISIBLE),  # Hangul filler
    ("alice\uffa0", INVISIBLE),  # halfwidth Hangul filler
    ("\u115falice", INVISIBLE),  # Hangul choseong filler
    ("\u0430lice", ONE_ALPHABET),  # Cyrillic а
    ("ali\u0441e", ONE_ALPHABET),  # Cyrillic с
    ("alice\u05b0", ONE_ALPHABET),  # a Hebrew point
    ("al\u0e31ice", ONE_ALPHABET),  # a Thai vowel sign
    ("al\u0131ce", LOOKS_LIKE_ALICE),  # Latin dotless ı
    ("\u1d00lice", LOOKS_LIKE_ALICE),  # Latin small capital ᴀ
    ("\u0430\u04cf\u0456\u0441\u0435", LOOKS_LIKE_ALICE),  # all Cyrillic: аӏісе
    ("a\u01c0ice", LOOKS_LIKE_ALICE),  # Latin letter dental click ǀ
    ("aIice", LOOKS_LIKE_ALICE),  # a capital I for the l
    ("a\u0196ice", LOOKS_LIKE_ALICE),  # Latin capital iota Ɩ for the l
    ("a\ua7aeice", LOOKS_LIKE_ALICE),  # Latin small capital I Ɪ for the l
    ("a\ua7feice", LOOKS_LIKE_ALICE),  # Latin epigraphic I longa ꟾ for the l
    ("\ua4ee\ua4e1\ua4f2\ua4da\ua4f0", LOOKS_LIKE_ALICE),  # Lisu, drawn as ALICE
    ("\u13aa\u13de\u13a5\u13df\u13ac", LOOKS_LIKE_ALICE),  # Cherokee, drawn as ALICE
    ("ALICE", "The name alice is taken."),
    ("a" + "\u0301" * 19, "Too many accents on one letter"),
], ids=lambda value: ascii(value))
def test_a_name_that_looks_like_an_online_students_is_refused(room, connect, name, reason):
    (alice,) = room("alice")
    impostor = connect()
    line = ask_name(impostor, name)
    assert line.startswith("*** " + reason), line
    assert line.endswith("What is your name?")
    impostor.send("mallory")  # asked again, and a real name gets in
    impostor.expect("*** Welcome, mallory!")
    alice.expect_next("*** mallory joined the chat.")  # nobody else joined meanwhile


def test_a_capital_i_looks_like_a_small_l_and_nothing_else(room, connect):
    """Cyrillic І looks just like Latin I: Іо cannot join beside Io; lan cannot join
    beside Ian. But Lan may (a capital L is no I), and so may AIDA beside Alda."""
    io, ian, alda = room("Io", "Ian", "Alda")
    assert "looks too much like Io" in ask_name(connect(), "\u0406\u043e")
    assert "looks too much like Ian" in ask_name(connect(), "lan")
    for name in ("Lan", "AIDA"):
        newcomer = connect()
        newcomer.send(name)
        newcomer.expect("*** Welcome, %s!" % name)


@pytest.mark.parametrize("name", ["t\u0435acher", "teacher.", "teacher_", "Teacher2",
                                  "te\u0430cher", "\u1d1beacher", "teache\u027e",
                                  "r\u09e6\u09e6t", "ADMIN", "teacher1", "Teacher_0",
                                  "1teacher", "admin01", "server-1",
                                  "\ua4d4\ua4f0\ua4ee\ua4da\ua4e7\ua4f0\ua4e3",
                                  "teacher\u02cd", "teacher\ua78f", "teach\u00e9r",
                                  "\u0442\u0435\u0430\u0441\u04bb\u0435\u0433"], ids=ascii)
def test_decorated_forms_of_teacher_are_refused(connect, name):
    line = ask_name(connect(), name)
    assert "reserved" in line or ONE_ALPHABET in line, line
    assert line.endswith("What is your name?")


def test_kick_alice_kicks_the_real_alice_after_impostors_tried(room, connect, console):
    alice, bob = room("alice", "bob")
    for name in ("alice\u034f", "al\u0131ce", "\u0430lice"):
        assert ask_name(connect(), name).endswith("What is your name?")  # refused
    console.handle_line("/kick alice")
    assert alice.expect_closed() == ["*** The teacher removed you from the chat."]
    bob.expect_next("*** alice left the chat.")


def test_the_teacher_kicks_a_cyrillic_name_by_typing_its_latin_look_alike(room, console):
    """The teacher's keyboard may have no Cyrillic: /kick alice finds аӏісе."""
    cyrillic, bob = room("\u0430\u04cf\u0456\u0441\u0435", "bob")
    console.handle_line("/kick alice")
    assert cyrillic.expect_closed() == ["*** The teacher removed you from the chat."]
    bob.expect_next("*** \u0430\u04cf\u0456\u0441\u0435 left the chat.")


def test_a_rename_to_a_look_alike_is_refused(room):
    alice, bob = room("alice", "bob")
    bob.send("/nick al\u0131ce")
    bob.expect_next("*** " + LOOKS_LIKE_ALICE)
    bob.send("/nick alice\u200b")
    bob.expect_next("*** " + INVISIBLE)
    alice.expect_nothing_before(bob)


@pytest.mark.parametrize("online, impostor", [
    ("bill", "bi\u01c1"),  # Latin letter lateral click ǁ for the ll
    ("kim", "\u0138im"),  # Latin kra ĸ for the k
])
def test_latin_letters_drawn_as_others_share_their_look(online, impostor):
    assert chat_server.name_problem(impostor) is None  # a real name's letters...
    assert set(chat_server.looks_of(online)) & set(chat_server.looks_of(impostor))  # ...alike


@pytest.mark.parametrize("name", ["田中たろう", "ヤマダ太郎", "金민수", "김민수", "Ωμέγα",
                                  "Зоя_2", "Zoë-Ångström", "Zoe\u0308", "नमस्ते",
                                  "שָׁלוֹם", "สมชาย", "か\u3099"])
def test_real_names_in_one_writing_system_join(joined, name):
    joined(name)


# --- No student text looks like the server ------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("look ***** here", "look ** here"),
    ("＊＊＊ full width", "** full width"),
    ("﹡﹡﹡ small", "** small"),
    ("*＊﹡* mixed", "** mixed"),
    ("two ** stay", "two ** stay"),
    ("*\u200b** zero width", "** zero width"),
    ("**\u2060* word joiner", "** word joiner"),
    ("*\u0301** an accent", "** an accent"),
    ("*\u05b0*\u05b0* a Hebrew point", "** a Hebrew point"),
    ("*\u0e31*\u0e31* a Thai mark", "** a Thai mark"),
    ("*\U00016fe4*\ufff9* format characters", "** format characters"),
    ("\u2217\u2217\u2217 asterisk operators", "** asterisk operators"),
    ("\u2731\u2731\u2731 heavy asterisks", "** heavy asterisks"),
    ("**\ua673 a Slavonic asterisk", "** a Slavonic asterisk"),
    ("\u2042 an asterism, three in one", "** an asterism, three in one"),
    ("\u2051 alone stays", "\u2051 alone stays"),
    ("\u2051* two in one, and one", "** two in one, and one"),
    ("\u2722\u273a\u2749 spoked asterisks", "** spoked asterisks"),
    ("\U0001f7af\U0001f7b5\U0001f7bb geometric asterisks", "** geometric asterisks"),
    ("2*3*4 stays", "2*3*4 stays"),
])
def test_three_asterisks_or_more_become_two(room, text, shown):
    alice, bob = room("alice", "bob")
    bob.send(text)
    assert alice.expect_next("bob says:") == "bob says: " + shown


def test_a_line_padded_to_wrap_cannot_show_a_server_line(room):
    alice, bob = room("alice", "bob")
    bob.send("brb" + " " * 77 + "*** [teacher] Class is over. Everyone log off now.")
    line = alice.expect_next("bob says:")
    assert "***" not in line
    assert line.endswith("** [teacher] Class is over. Everyone log off now.")


@pytest.mark.parametrize("keys", ["\x1bOP", "\x1bOQ", "\x1bOA", "\x8fP"], ids=ascii)
def test_ss3_function_keys_are_removed_whole(room, keys):
    alice, bob = room("alice", "bob")
    bob.send("a" + keys + "b")
    assert alice.expect_next("bob says:") == "bob says: ab"


# --- No traceback, no hang, nothing lost ---------------------------------------------

class SocketClosedUnderTheWriter:
    """What a kick during a burst leaves: the socket was full a moment ago, and
    is closed (fileno -1) by the time the writer thread starts."""

    def send(self, data):
        raise BlockingIOError(errno.EAGAIN, "full")

    def fileno(self):
        return -1

    def shutdown(self, how):
        raise OSError(errno.EBADF, "closed")


def test_a_writer_started_after_its_socket_closed_ends_quietly():
    client = Client(SocketClosedUnderTheWriter(), ("127.0.0.1", 9), 65536)
    client.send_line("hello")  # the socket is "full": the writer thread starts
    assert client.wait_closed(TIMEOUT), "the writer did not finish"
    # An exception escaping the writer thread fails this test (see conftest).


SLOW_SHUTDOWN_FLAGS = ("--flood-rate", "0", "--sendq", "100000000", "--max-line", "65536")


def stall_the_shutdown(server):
    """Make the shutdown of server (started with SLOW_SHUTDOWN_FLAGS) wait about a second.

    Returns (stalled, bob): stalled joined and never reads; bob sent it 6 MB,
    more than the socket buffers take (4 MB at most by Linux's default
    tcp_wmem), so the rest stays in its outbox, and the shutdown waits for it.
    """
    stalled = server.client(rcvbuf=4096)
    stalled.send("stalled")
    stalled.expect("*** Online now")
    bob = server.join("bob")
    bob.sock.settimeout(TIMEOUT)
    bob.send_raw((b"z" * 60000 + b"\r\n") * 100)
    bob.send("/who")
    bob.expect("*** Online now (2)")  # every line before it was handled
    return stalled, bob


@POSIX_ONLY
def test_a_second_ctrl_c_during_the_shutdown_stops_at_once_with_status_130():
    with server_process(*SLOW_SHUTDOWN_FLAGS) as server:
        stalled, bob = stall_the_shutdown(server)
        server.process.send_signal(signal.SIGINT)
        server.expect_log("Shutting down")  # the shutdown has begun
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        status = server.process.wait(TIMEOUT)
        took = time.monotonic() - started
        stderr = server.stderr_text()
        for client in (bob, stalled):
            client.close()
    assert status == chat_server.EXIT_INTERRUPTED == 130, stderr[-1500:]
    assert "Stopped at once" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Closed connection: stalled" not in stderr  # it came during the shutdown
    assert took < 0.9, "took %.2f s" % took  # not the rest of the shutdown


@POSIX_ONLY
def test_ctrl_c_during_a_shutdown_the_console_began_stops_at_once_with_status_130():
    with server_process(*SLOW_SHUTDOWN_FLAGS, stdin=subprocess.PIPE) as server:
        stalled, bob = stall_the_shutdown(server)
        server.type("/shutdown")
        server.expect_log("Shutting down")  # the shutdown has begun
        server.process.send_signal(signal.SIGINT)
        status = server.process.wait(TIMEOUT)
        stderr = server.stderr_text()
        for client in (bob, stalled):
            client.close()
    assert status == chat_server.EXIT_INTERRUPTED, stderr[-1500:]
    assert "Stopped at once" in stderr


@POSIX_ONLY
def test_a_connection_during_the_shutdown_is_told_so_and_the_server_exits_cleanly():
    """Ctrl+C closes the room while the server still accepts; then it stops."""
    with server_process(*SLOW_SHUTDOWN_FLAGS) as server:
        stalled, bob = stall_the_shutdown(server)
        server.process.send_signal(signal.SIGINT)
        server.expect_log("Shutting down")  # the shutdown has begun
        newcomer = server.client()
        said = newcomer.expect_closed()
        status = server.process.wait(TIMEOUT)
        stderr = server.stderr_text()
        for client in (bob, stalled, newcomer):
            client.close()
    assert said == ["*** Server is shutting down."]
    assert status == chat_server.EXIT_OK, stderr[-1500:]
    assert "Traceback" not in stderr


# Runs the server with SIGXFSZ ignored, so that a file-size limit (a full disk,
# played by resource.prlimit) makes write() fail with EFBIG instead of killing it.
NO_SIGXFSZ_LAUNCHER = (
    "import runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

needs_prlimit = pytest.mark.skipif(not hasattr(resource, "prlimit"),
                                   reason="resource.prlimit is Linux only")


def transcript_lines(path):
    with open(path, "rb") as transcript:
        data = transcript.read()
    assert data.endswith(b"\n"), "a broken line at the end: %r" % data[-60:]
    return [line[20:] for line in data.decode("utf-8").splitlines()]  # without the time


@needs_prlimit
def test_transcript_on_a_full_disk_loses_no_line_silently_and_resumes(tmp_path):
    path = tmp_path / "chat.log"
    with server_process("--transcript", str(path), launcher=NO_SIGXFSZ_LAUNCHER) as server:
        pid = server.process.pid
        alice, bob = server.join("alice"), server.join("bob")
        alice.expect("bob joined")
        bob.send("before")
        alice.expect("bob says: before")
        wait_until(lambda: "bob says: before" in path.read_text(), message="'before' written")
        # The disk fills up: room for 10 more bytes, less than any line.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (path.stat().st_size + 10,
                                                      resource.RLIM_INFINITY))
        for n in range(3):
            bob.send("lost %d" % n)
            alice.expect_next("bob says: lost %d" % n)  # the room goes on
        server.expect_log("Could not write the transcript")
        # The writer may be between a short write and its undoing (of "lost 1"
        # or "lost 2"): what counts is that it settles on a whole line, with no
        # half line after it. (Read once for both: a second read raced the
        # next short write in CI.)

        def settled_on_before():
            data = path.read_bytes()
            return data.endswith(b"\n") and \
                data.decode("utf-8").splitlines()[-1][20:] == "bob says: before"

        wait_until(settled_on_before, message="the transcript to end, whole, with 'before'")
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,
                                                      resource.RLIM_INFINITY))
        bob.send("after")
        alice.expect_next("bob says: after")
        line = server.expect_log("The transcript is being written again")
        lost = int(re.search(r"(\d+) lines? could not be written", line).group(1))
        wait_until(lambda: "bob says: after" in path.read_text(), message="'after' written")
        bob.send("and on")  # written like any line: the recovery is not told again
        alice.expect_next("bob says: and on")
        wait_until(lambda: "bob says: and on" in path.read_text(), message="'and on' written")
        # Full again at the shutdown: still a clean exit.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (path.stat().st_size,
                                                      resource.RLIM_INFINITY))
        server.process.terminate()
        status = server.process.wait(TIMEOUT)
        stderr = server.stderr_text()
        alice.close()
        bob.close()
    assert status == 0
    assert "Traceback" not in stderr
    assert stderr.count("The transcript is being written again") == 1, stderr
    # Every line is either in the transcript or counted as lost: the last one
    # may have been written after the disk had room again.
    events = transcript_lines(path)
    written = ["bob says: lost %d" % n for n in range(lost, 3)]
    assert 1 <= lost <= 3
    assert events[events.index("bob says: before"):] == (
        ["bob says: before"] + written + ["bob says: after", "bob says: and on"])


@POSIX_ONLY
def test_transcript_fifo_with_no_reader_is_refused_at_start(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(str(fifo))
    finished = subprocess.run(
        [sys.executable, SERVER_SCRIPT, "--port", "0", "--transcript", str(fifo)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    stderr = finished.stderr.decode("utf-8", "replace")
    assert finished.returncode == 2
    assert "Cannot open the transcript" in stderr and "Traceback" not in stderr


@POSIX_ONLY
def test_transcript_fifo_that_is_never_read_neither_stops_the_room_nor_sigterm(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(str(fifo))
    reader = os.open(str(fifo), os.O_RDONLY | os.O_NONBLOCK)  # open, and never read
    try:
        with server_process("--transcript", str(fifo), "--flood-rate", "0") as server:
            alice, bob = server.join("alice"), server.join("bob")
            alice.expect("bob joined")
            bob.sock.settimeout(TIMEOUT)
            bob.send_raw(b"".join(b"line %d %s\r\n" % (n, b"y" * 500) for n in range(300)))
            for n in range(300):  # 150 KB, more than a pipe holds
                alice.expect_next("bob says: line %d " % n)
            server.expect_log("Could not write the transcript")
            started = time.monotonic()
            server.process.terminate()
            status = server.process.wait(TIMEOUT)
            took = time.monotonic() - started
            stderr = server.stderr_text()
            alice.close()
            bob.close()
    finally:
        os.close(reader)
    assert status == 0
    assert took < 4.0, "SIGTERM took %.1f s" % took
    assert "Traceback" not in stderr


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill (POSIX)")
def test_a_signal_taken_by_another_thread_still_ends_the_main_threads_wait_at_once():
    """The OS may hand a second Ctrl+C to any thread: the shutdown's waits notice it."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    # The main thread waits on never, and the exception lands in that wait:
    # it may leave never's lock taken, so nothing touches never after it.
    never = threading.Event()
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(TIMEOUT,), daemon=True)
    other.start()
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        started = time.monotonic()
        threading.Timer(0.1, signal.pthread_kill, (other.ident, signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            chat_server.wait_in_slices(never.wait, 3.0)
        took = time.monotonic() - started
    finally:
        signal.signal(signal.SIGUSR1, previous)
        release.set()
    assert took < 1.0, "the handler waited %.2f s for the main thread's wait" % took
