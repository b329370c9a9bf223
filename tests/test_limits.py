"""SPEC's limits over real sockets: names, password, timeouts, flood, slow readers, room size."""

import errno
import socket
import threading
import time

import pytest

import chat_server
from chat_server import Client, TeacherConsole, enable_keepalive
from conftest import TIMEOUT, ChatClient, expect_console, wait_until


# --- Reaching into the in-process server ---

def server_side(server, name):
    """The server's Client object for the connection that joined as name."""
    with server._lock:
        found = [client for client in server._connected if client.name == name]
    assert len(found) == 1, "no single connection called %s" % name
    return found[0]


# More than a stalled socket's buffers ever take (servers that send it need
# max_line=BIG_LINE_BYTES).
BIG_LINE_BYTES = 40_000


def stall(server, name, sender, reader):
    """Leave the server's writer for name (a client that never reads) stuck mid-line.

    Shrinks the server's send buffer for that connection (the client is meant
    to have a small receive buffer too), then sender says one line bigger
    than both buffers together, which reader reads. Returns the server's Client.
    """
    slow = server_side(server, name)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    line = "x" * BIG_LINE_BYTES
    sender.send(line)
    reader.expect_next(line)
    wait_until(lambda: slow._backlogged, message="the writer to wait on a full socket")
    return slow


def read_until_closed(client, timeout=TIMEOUT):
    """Read (and throw away) all a client is sent until the server closes; fail if it does not."""
    deadline = time.monotonic() + timeout
    try:
        while client._fill(deadline):
            client.buffer = b""
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail("the server did not close the connection")


# --- Names ---

@pytest.mark.parametrize(
    "taken, asked",
    [("alice", "Alice"), ("alice", "ALICE"), ("alice", "ａｌｉｃｅ")],
    ids=["capitalised", "upper case", "full width"],
)
def test_taken_name_is_refused_ignoring_case_and_width(joined, connect, taken, asked):
    joined(taken)
    newcomer = connect()
    newcomer.expect("What is your name?")
    newcomer.send(asked)
    newcomer.expect_next("*** The name alice is taken. What is your name?")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("teacher", "reserved"),
        ("two words", "only letters"),
        ("x" * 21, "too long"),
        ("x" * 2000, "too long"),
    ],
    ids=["reserved", "invalid", "21 characters", "longer than a line"],
)
def test_bad_name_gets_a_reason_and_a_new_prompt(connect, name, reason):
    client = connect()
    client.expect("What is your name?")
    client.send(name)
    line = client.expect_next(reason)
    assert line.endswith("What is your name?")
    client.send("fine_name")
    client.expect("*** Welcome, fine_name!")


def test_empty_name_just_asks_again(connect):
    client = connect()
    client.expect("What is your name?")
    client.send("")
    client.expect_next("*** What is your name?")


def test_unicode_name_is_welcome(room):
    alice, zoe, li = room("alice", "Zoë_Ångström", "李小龍")
    zoe.send("hi")
    alice.expect_next("Zoë_Ångström says: hi")
    li.send("你好")
    alice.expect_next("李小龍 says: 你好")


def test_name_timeout_closes_a_silent_connection(start_server, connect):
    server = start_server(name_timeout=0.2)
    client = connect(server)
    lines = client.expect_closed()
    assert lines[-1] == "*** You did not give a name in time. Goodbye."


def test_name_timeout_zero_waits_for_a_name(start_server, connect):
    """A room with a timeout closes its silent newcomer; one with 0 keeps its own."""
    timed = start_server(name_timeout=0.2)
    untimed = start_server(name_timeout=0)
    waiting = connect(untimed)
    waiting.expect("What is your name?")
    connect(timed).expect_closed()  # proves the time has passed
    waiting.send("slowpoke")
    waiting.expect_next("*** Welcome, slowpoke!")


def test_name_timeout_does_not_close_a_joined_client(start_server, room, connect):
    server = start_server(name_timeout=0.3)
    alice, bob = room("alice", "bob", target=server)
    latecomer = connect(server)  # connected after bob: its timeout ends after his would
    assert latecomer.expect_closed()[-1] == "*** You did not give a name in time. Goodbye."
    bob.send("still here")
    alice.expect_next("bob says: still here")


# --- Password ---

def test_right_password_lets_a_client_in(start_server, connect):
    server = start_server(password="s3cret")
    client = connect(server)
    client.expect("This room has a password. Password?")
    client.send(" s3cret ")  # spaces around it, as people type them, do not count
    client.expect("What is your name?")
    client.send("alice")
    client.expect("*** Welcome, alice!")


def test_enter_alone_at_the_password_prompt_asks_again(start_server, connect):
    server = start_server(password="s3cret")
    client = connect(server)
    client.expect("Password?")
    client.send("")
    client.expect_next("*** This room has a password. Password?")
    client.send("s3cret")
    client.expect("What is your name?")
    assert server.addresses.password_wait("127.0.0.1") == 0


@pytest.mark.parametrize("guesses", [["guess", "s3cre", "S3CRET", "s3cret!"]],
                         ids=["near misses"])
def test_wrong_password_is_refused_after_a_delay_and_closed(start_server, connect, guesses):
    server = start_server(password="s3cret")
    clients = [connect(server) for _ in guesses]
    for client in clients:
        client.expect("Password?")
    started = time.monotonic()
    for client, guess in zip(clients, guesses):  # all at once: one delay for the test
        client.send(guess)
    for client, guess in zip(clients, guesses):
        assert client.expect_closed() == ["*** Wrong password. Goodbye."], guess
    took = time.monotonic() - started
    # A lower bound, so a loaded machine cannot make it fail: guessing is slow.
    assert took >= 0.9 * chat_server.PASSWORD_ANSWER_SECONDS, "refused after %.2f s" % took


# --- Flood ---

def test_flood_is_delayed_in_order_with_nothing_lost(start_server, room):
    server = start_server(flood_rate=80, flood_burst=5)
    alice, bob = room("alice", "bob", target=server)
    started = time.monotonic()
    bob.send_raw(b"".join(b"line %d\r\n" % n for n in range(25)))
    for n in range(25):
        alice.expect_next("bob says: line %d" % n)
    assert time.monotonic() - started >= (25 - 5) / 80 * 0.9  # held back, not dropped


def test_flooder_is_told_once_to_slow_down(start_server, room):
    server = start_server(flood_rate=50, flood_burst=2)
    alice, bob = room("alice", "bob", target=server)
    bob.send_raw(b"".join(b"line %d\r\n" % n for n in range(10)))
    bob.expect_next("*** You are sending lines too fast")
    for n in range(10):
        alice.expect_next("bob says: line %d" % n)
    alice.send("sentinel")
    bob.expect_next("alice says: sentinel")  # no second notice


def test_flooder_is_told_again_after_slowing_down(start_server, room, monkeypatch):
    now = [100.0]  # the flood limiter's clock, moved by hand
    class FloodLimiterOnHandClock(chat_server.FloodLimiter):
        def __init__(self, rate, burst, clock=None):
            super().__init__(rate, burst, clock=lambda: now[0])

    monkeypatch.setattr(chat_server, "FloodLimiter", FloodLimiterOnHandClock)
    # (No per-computer pace: on this clock it would never refill either.)
    server = start_server(flood_rate=50, flood_burst=2, per_address=0)
    alice, bob = room("alice", "bob", target=server)
    for burst in range(2):
        bob.send_raw(b"".join(b"burst %d line %d\r\n" % (burst, n) for n in range(5)))
        bob.expect_next("*** You are sending lines too fast")
        for n in range(5):
            alice.expect_next("bob says: burst %d line %d" % (burst, n))
        now[0] += 60  # a calm minute: the next burst is a new flood


def test_flooder_kicked_while_held_back_sends_nothing_more(start_server, room):
    """The kick ends the flooder's wait at once: its reader does not sleep it out."""
    # 10 s between lines (longer than TIMEOUT); a burst of 2: the name takes
    # one token, "flood 0" the other.
    server = start_server(flood_rate=0.1, flood_burst=2)
    alice, bob, carol = room("alice", "bob", "carol", target=server)
    bob.send_raw(b"".join(b"flood %d\r\n" % n for n in range(5)))
    alice.expect_next("bob says: flood 0")
    bob.expect_next("*** You are sending lines too fast")  # "flood 1" is held back now
    TeacherConsole(server, None).handle_line("/kick bob")
    alice.expect_next("*** bob left the chat.")
    wait_until(lambda: server.places_taken() == 2, message="bob's reader to finish")
    alice.expect_nothing_before(carol)


def test_flooder_does_not_slow_the_others(start_server, room):
    server = start_server(flood_rate=1, flood_burst=2)  # the name, then "flood 0"
    alice, bob, carol = room("alice", "bob", "carol", target=server)
    bob.send_raw(b"".join(b"flood %d\r\n" % n for n in range(30)))
    alice.expect_next("bob says: flood 0")
    carol.send("hello")
    alice.expect("carol says: hello", timeout=1.5)  # long before bob's 30 s of lines


# --- Slow readers ---

SLOW_LEFT = "*** slow left the chat."


def test_a_student_who_never_reads_the_answers_to_their_commands_is_dropped(
        start_server, joined, caplog):
    """Replies fill an outbox too: nobody else's line need come to find it full."""
    server = start_server(flood_rate=0, sendq=4096)
    alice = joined("alice", server)
    slow = joined("slow", server, rcvbuf=4096)  # then never reads
    alice.expect_next("slow joined")
    slow.send_raw(b"/help\r\n" * 20000)  # megabytes of answers
    alice.expect_next(SLOW_LEFT)
    expect_console(caplog, "Disconnecting slow (127.0.0.1:")


def test_slow_reader_whose_writer_is_stuck_is_dropped_at_once(start_server, room, joined, caplog):
    """The drop comes while the slow client's writer waits on its full socket."""
    server = start_server(flood_rate=0, sendq=64 * 1024, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    slow = joined("slow", server, rcvbuf=4096)  # joins, then never reads
    alice.expect_next("slow joined")
    bob.expect_next("slow joined")
    stall(server, "slow", bob, alice)
    bob.send("y" * BIG_LINE_BYTES)  # more than --sendq can hold on top of the first
    alice.expect_next("bob says: yyy")
    alice.expect_next(SLOW_LEFT)
    # Closed by the server at once, although slow has not read a byte more.
    wait_until(lambda: server.places_taken() == 2, message="the slow connection to close")
    # The console line goes through the recorder thread: it may come a moment later.
    line = expect_console(caplog, "Disconnecting slow (127.0.0.1:")
    assert line.endswith(": too slow to keep up"), line
    read_until_closed(slow)
    bob.send("still chatting")
    alice.expect_next("bob says: still chatting")


def test_shutdown_closes_a_stalled_connection_within_two_seconds(
        start_server, room, joined, monkeypatch):
    """Within two grace periods (shortened here) although it never reads."""
    monkeypatch.setattr(chat_server, "SHUTDOWN_GRACE_SECONDS", 0.3)
    server = start_server(flood_rate=0, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    stalled = joined("stalled", server, rcvbuf=4096)  # joins, then never reads
    alice.expect_next("stalled joined")
    bob.expect_next("stalled joined")
    stall(server, "stalled", bob, alice)
    started = time.monotonic()
    server.close_room()  # what Ctrl+C does, before the process exits
    took = time.monotonic() - started
    alice.expect_next("*** Server is shutting down.")
    wait_until(lambda: server.places_taken() == 0, message="every connection to close")
    read_until_closed(stalled)
    assert took < 2 * chat_server.SHUTDOWN_GRACE_SECONDS + 0.5, "took %.1f s" % took


def test_shutdown_lets_a_lagging_reader_finish_its_backlog_and_read_goodbye(
        start_server, room, joined):
    """The grace period is for this: a reader behind, but reading, gets every line."""
    server = start_server(flood_rate=0, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    lagging = joined("lagging", server, rcvbuf=4096)
    alice.expect_next("lagging joined")
    bob.expect_next("lagging joined")
    stall(server, "lagging", bob, alice)  # its writer waits on a full socket
    closing = threading.Thread(target=server.close_room, daemon=True)
    closing.start()
    try:
        lagging.expect_next("bob says: xxx")  # it reads again: the rest comes...
        lagging.expect_next("*** Server is shutting down.")  # ...then the goodbye
    finally:
        closing.join(TIMEOUT)


def full_socket_pair():
    """A connected pair whose first end cannot send: the other never reads."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        while True:
            ours.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return ours, theirs


def test_queue_bytes_only_queues_and_flush_sends_at_once():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        client = Client(ours, ("127.0.0.1", 9), sendq_bytes=100)  # writer not started
        assert client.queue_bytes(b"hello\r\n")  # what the room does under its lock
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # nothing was sent yet
        client.flush()  # what the room does after releasing it
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(100) == b"hello\r\n"
    finally:
        ours.close()
        theirs.close()


def test_writer_thread_sends_what_a_full_socket_could_not_take():
    ours, theirs = full_socket_pair()
    client = Client(ours, ("127.0.0.1", 9), sendq_bytes=1 << 20)
    try:
        assert client.send_bytes(b"the end\r\n")  # the socket is full: this waits in the outbox
        received = b""
        theirs.settimeout(TIMEOUT)
        while not received.endswith(b"the end\r\n"):  # the peer reads at last
            data = theirs.recv(1 << 20)
            assert data, "closed before the queued line came"
            received += data
    finally:
        client.close_now()
        ours.close()
        theirs.close()


def read_until_it_ends_with(sock, ending):
    received = b""
    sock.settimeout(TIMEOUT)
    while not received.endswith(ending):
        data = sock.recv(1 << 20)
        assert data, "closed before %r came" % ending
        received += data
    return received


def test_writer_thread_wakes_again_for_a_second_backlog():
    ours, theirs = full_socket_pair()
    client = Client(ours, ("127.0.0.1", 9), sendq_bytes=1 << 20)
    try:
        assert client.send_bytes(b"first\r\n")  # the writer starts, and sends it once there is room
        read_until_it_ends_with(theirs, b"first\r\n")
        wait_until(lambda: not client._backlogged, message="the writer to go idle")
        try:
            while True:  # full again, while the writer sleeps
                ours.send(b"y" * 65536)
        except BlockingIOError:
            pass
        assert client.send_bytes(b"second\r\n")
        read_until_it_ends_with(theirs, b"second\r\n")
    finally:
        client.close_now()
        ours.close()
        theirs.close()


def test_a_writer_that_cannot_start_closes_only_its_own_client(monkeypatch, caplog):
    """No thread could start (too many): that client is closed, and the sender goes on."""
    real_start = threading.Thread.start

    def start_failing_for_writers(thread):
        if thread.name.startswith("writer"):
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_failing_for_writers)
    ours, theirs = full_socket_pair()
    client = Client(ours, ("127.0.0.1", 9), sendq_bytes=1 << 20)
    try:
        client.send_bytes(b"first\r\n")  # needs the writer: the socket is full
        assert client.closed.is_set()
        assert any("Cannot start a writer" in record.getMessage() for record in caplog.records)
        caplog.clear()  # the one error this test caused on purpose
    finally:
        client.close_now()
        ours.close()
        theirs.close()


def test_what_the_writer_sent_no_longer_counts_against_sendq():
    """A reader that keeps up, slowly, is never dropped for what it already read."""
    ours, theirs = full_socket_pair()
    client = Client(ours, ("127.0.0.1", 9), sendq_bytes=1000)
    try:
        for round_ in range(3):  # 1800 bytes in all, through the writer: more than sendq
            assert client.send_bytes(b"%d%s\r\n" % (round_, b"z" * 597)), "round %d" % round_
            read_until_it_ends_with(theirs, b"z\r\n")
            wait_until(lambda: not client._backlogged, message="the writer to go idle")
            try:
                while True:  # full again, so the next line goes through the writer too
                    ours.send(b"y" * 65536)
            except BlockingIOError:
                pass
    finally:
        client.close_now()
        ours.close()
        theirs.close()


def test_outbox_takes_up_to_sendq_bytes_once_the_socket_is_full():
    ours, theirs = full_socket_pair()
    try:
        client = Client(ours, ("127.0.0.1", 9), sendq_bytes=100)  # writer not started
        assert client.queue_bytes(b"x" * 60)
        assert client.queue_bytes(b"x" * 40)
        assert not client.queue_bytes(b"x")  # full: the caller must drop this client
        assert client.queue_bytes(b"x" * 500)  # being dropped: quietly discarded
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def stuck_client():
    """A Client whose socket is full, with a --sendq of 100 bytes (writer not started)."""
    ours, theirs = full_socket_pair()
    yield Client(ours, ("127.0.0.1", 9), sendq_bytes=100)
    ours.close()
    theirs.close()


def test_a_kicked_student_who_stopped_reading_is_disconnected(start_server, room, joined):
    """A suspended nc, kicked: its goodbye cannot go out, and its place is freed all the same."""
    server = start_server(flood_rate=0, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    joined("stalled", server, rcvbuf=4096)  # joins, then never reads
    alice.expect_next("stalled joined")
    bob.expect_next("stalled joined")
    stalled = stall(server, "stalled", bob, alice)
    TeacherConsole(server, None).handle_line("/kick stalled")
    alice.expect_next("*** stalled left the chat.")
    wait_until(lambda: stalled not in server._connected, message="its connection to close")


def test_a_client_closed_after_sending_is_closed_anyway_if_it_never_reads(stuck_client):
    """A kicked student whose nc is suspended must not keep their place for good."""
    stuck_client.send_line("*** You were removed by the teacher.")  # stays queued
    stuck_client.close_when_sent()
    assert stuck_client.wait_closed(chat_server.SHUTDOWN_GRACE_SECONDS + 5)


def test_a_piece_longer_than_sendq_leaves_room_for_sendq_more_behind_it(stuck_client):
    """A long history or line goes into an empty outbox; a slow link takes a
    while to send it, and the lines that come meanwhile may add --sendq more."""
    assert stuck_client.queue_bytes(b"h" * 500)
    assert stuck_client.queue_bytes(b"x" * 100)
    assert not stuck_client.queue_bytes(b"x")  # past that: too slow


def test_a_piece_longer_than_sendq_goes_in_behind_a_short_one(stuck_client):
    """A long line comes while a join line still waits: a reader that keeps up stays."""
    assert stuck_client.queue_bytes(b"j" * 30)
    assert stuck_client.queue_bytes(b"h" * 500)
    assert stuck_client.queue_bytes(b"x" * 70)
    assert not stuck_client.queue_bytes(b"x")  # past --sendq, the long piece aside


def test_the_room_behind_a_long_piece_shrinks_as_it_is_sent(stuck_client):
    """Once the long piece is out, the outbox holds --sendq again, no more."""
    assert stuck_client.queue_bytes(b"h" * 500)
    assert stuck_client.queue_bytes(b"x" * 50)  # came while the long piece went out
    with stuck_client._outbox_lock:
        stuck_client._count_sent(500)  # as the writer does once it has sent those
    assert stuck_client.queue_bytes(b"x" * 50)
    assert not stuck_client.queue_bytes(b"x")  # 101 bytes wait: past --sendq


def test_client_that_reads_gets_far_more_than_sendq_and_stays(start_server, room):
    server = start_server(flood_rate=0, sendq=4096)
    alice, bob = room("alice", "bob", target=server)
    for number in range(40):  # 40 KB in all, ten times --sendq
        bob.send("%d %s" % (number, "z" * 1000))
        alice.expect_next("bob says: %d z" % number)
    bob.send("/who")
    bob.expect_next("*** Online now (2): alice, bob")


def test_lines_sent_in_pieces_arrive_whole_once_and_in_order():
    """Small socket buffers and a slow reader: sends are cut short, often."""
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours, _ = listener.accept()
    listener.close()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    client = Client(ours, ("127.0.0.1", 9), sendq_bytes=1 << 20)
    lines = [b"line %d %s\r\n" % (number, b"q" * (number * 37 % 1500)) for number in range(100)]
    expected = b"".join(lines)
    received = bytearray()

    def read_slowly():
        while len(received) < len(expected):
            data = theirs.recv(4096)
            if not data:
                break
            received.extend(data)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        for line in lines:
            assert client.send_bytes(line)
        reader.join(TIMEOUT)
        assert bytes(received) == expected
    finally:
        client.close_now()
        reader.join(TIMEOUT)
        ours.close()
        theirs.close()


def test_shutdown_ends_as_soon_as_every_connection_has_closed(server, room, monkeypatch):
    """Not at the end of the grace: the last connection to finish wakes it."""
    monkeypatch.setattr(chat_server, "SHUTDOWN_GRACE_SECONDS", 3.0)
    unregister = chat_server.ChatServer.unregister

    def slow_unregister(self, client):  # readers that finish a moment after the rest
        time.sleep(0.2)  # (a slow server thread, not a wait of the test)
        unregister(self, client)

    monkeypatch.setattr(chat_server.ChatServer, "unregister", slow_unregister)
    alice, bob = room("alice", "bob")
    started = time.monotonic()
    server.close_room()
    took = time.monotonic() - started
    assert server.places_taken() == 0
    assert took < 1.5, "took %.2f s" % took
    alice.expect_next("*** Server is shutting down.")


def test_a_connection_that_comes_during_the_shutdown_is_told_so_and_closed(server, connect):
    server.close_room()  # the server still accepts until it stops, a moment later
    assert connect().expect_closed() == ["*** Server is shutting down."]


def test_a_browser_that_comes_during_the_shutdown_gets_a_503_page_saying_so(
        server, connect):
    server.close_room()
    browser = connect()
    browser.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    lines = browser.expect_closed()
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Server is shutting down." in lines[-1]


def test_browsers_still_in_the_backlog_when_the_server_closes_get_the_503_page(
        server, connect):
    server.close_room()
    server.shutdown()
    browsers = [connect() for _ in range(3)]  # in the backlog, their requests unread
    for browser in browsers:
        browser.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    server.server_close()
    for browser in browsers:
        lines = browser.expect_closed()
        assert lines[0] == "HTTP/1.1 503 Service Unavailable"
        assert "Server is shutting down." in lines[-1]


def test_a_connection_that_comes_while_the_backlog_is_answered_is_told_too(
        server, connect, monkeypatch):
    server.close_room()
    server.shutdown()
    late, answer_all_now = [], server._refuser.answer_all_now

    def answering(seconds):  # a newcomer comes meanwhile, into the backlog
        if not late:
            late.append(connect())
        answer_all_now(seconds)

    monkeypatch.setattr(server._refuser, "answer_all_now", answering)
    server.server_close()
    assert late[0].expect_closed() == ["*** Server is shutting down."]


def test_what_the_refuser_holds_is_answered_before_the_server_exits(
        server, connect, monkeypatch):
    """It waits for a browser's request; a server about to exit cannot wait."""
    monkeypatch.setattr(chat_server, "BROWSER_WAIT_SECONDS", 30.0)
    server.close_room()
    newcomer = connect()  # held by the refuser, which waits for a request
    wait_until(lambda: server._refuser._thread is not None, message="the refuser to start")
    server.shutdown()
    server.server_close()
    assert newcomer.expect_closed() == ["*** Server is shutting down."]


def test_a_connection_still_in_the_backlog_when_the_server_closes_is_told_so(
        server, connect):
    """The OS accepted it, serve_forever() had stopped: closing would reset it."""
    server.close_room()
    server.shutdown()  # what stop_serving() does; serve() then calls server_close()
    newcomer = connect()  # in the listening socket's backlog
    server.server_close()
    assert newcomer.expect_closed() == ["*** Server is shutting down."]


def test_a_connection_that_comes_while_the_room_closes_is_told_so(
        start_server, room, joined, connect, monkeypatch):
    """stop_serving() (Ctrl+C, /shutdown) closes the room while it still accepts."""
    monkeypatch.setattr(chat_server, "SHUTDOWN_GRACE_SECONDS", 3.0)
    server = start_server(flood_rate=0, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    joined("stalled", server, rcvbuf=4096)  # joins, then never reads
    alice.expect_next("stalled joined")
    bob.expect_next("stalled joined")
    stall(server, "stalled", bob, alice)  # the room's closing waits for it
    stopping = threading.Thread(target=server.stop_serving, daemon=True)
    stopping.start()
    try:
        alice.expect_next("*** Server is shutting down.")  # the room is closing
        assert connect(server).expect_closed() == ["*** Server is shutting down."]
    finally:
        stopping.join(TIMEOUT)


def test_closing_the_room_again_waits_until_the_first_closing_has_ended(
        start_server, room, joined, monkeypatch):
    """/shutdown began it, then Ctrl+C: serve() must not exit with the room half closed."""
    monkeypatch.setattr(chat_server, "SHUTDOWN_GRACE_SECONDS", 3.0)
    server = start_server(flood_rate=0, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    joined("stalled", server, rcvbuf=4096)
    alice.expect_next("stalled joined")
    bob.expect_next("stalled joined")
    stall(server, "stalled", bob, alice)  # the first closing waits for it
    first = threading.Thread(target=server.close_room, daemon=True)
    first.start()
    try:
        alice.expect_next("*** Server is shutting down.")  # the first has begun
        server.close_room()
        assert server.snapshot()[:2] == ([], [])  # everyone gone: the first has ended
    finally:
        first.join(TIMEOUT)


def test_a_connection_admitted_just_before_the_room_closes_gets_one_goodbye(
        server, connect, monkeypatch):
    """Its thread starts after close_room() said goodbye to every connection."""
    register = chat_server.ChatServer.register
    closing = threading.Thread(target=server.close_room, daemon=True)

    def late_register(room, client):
        closing.start()
        wait_until(lambda: room._said_goodbye, message="the room to begin closing")
        return register(room, client)

    monkeypatch.setattr(chat_server.ChatServer, "register", late_register)
    try:
        assert connect().expect_closed() == ["*** Server is shutting down."]
    finally:
        closing.join(TIMEOUT)


def test_a_name_given_as_the_shutdown_begins_gets_one_goodbye_and_does_not_join(
        server, connect, monkeypatch):
    refused = threading.Event()
    real_ask, real_close_when_sent = chat_server.ask_name, chat_server.Client.close_when_sent

    def ask_name(handler, *args):
        answer = real_ask(handler, *args)
        refused.set()  # the name was handled: refused, and anything said about it queued
        return answer

    def close_when_sent(client):  # the newcomer's name comes after the goodbye is queued
        if not client.name:
            newcomer.send("nina")
            assert refused.wait(TIMEOUT), "the name was not handled"
        return real_close_when_sent(client)

    monkeypatch.setattr(chat_server, "ask_name", ask_name)
    monkeypatch.setattr(chat_server.Client, "close_when_sent", close_when_sent)
    newcomer = connect()
    newcomer.expect("What is your name?")
    server.close_room()
    assert [line for line in newcomer.expect_closed() if "shutting down" in line] == [
        "*** Server is shutting down."]
    assert server.find("nina") is None  # and never in the room


def test_nothing_is_said_in_the_room_after_the_goodbye(server, room):
    """A line handled as the shutdown began (held back by the flood limit until the
    shutdown woke it, say) reached some students after "Server is shutting down."."""
    alice, bob = room("alice", "bob")
    with server._lock:
        server._said_goodbye = True  # the moment close_room() has begun
    bob.send("too late")
    bob.send("/who")
    bob.expect_next("Online now")  # bob's line has been handled
    server.close_room()
    assert alice.expect_closed() == ["*** Server is shutting down."]


def test_a_newcomer_whose_history_is_longer_than_sendq_gets_it_all(start_server, room):
    server = start_server(flood_rate=0, sendq=4096)
    alice, = room("alice", target=server)
    for number in range(8):  # 8 KB of history, twice --sendq
        alice.send("%d %s" % (number, "h" * 1000))
    wait_until(lambda: len(server._history) >= 9, message="the lines in the history")
    bob, = room("bob", target=server)
    assert len([line for line in bob.seen if line.startswith("alice says: ")]) == 8
    alice.send("still here?")
    bob.expect_next("alice says: still here?")


def test_a_line_longer_than_sendq_reaches_a_reader_that_keeps_up(start_server, room):
    server = start_server(flood_rate=0, sendq=4096, max_line=8192)
    alice, bob = room("alice", "bob", target=server)
    bob.send("x" * 6000)
    alice.expect_next("bob says: " + "x" * 6000)
    bob.send("and again")
    alice.expect_next("bob says: and again")


def test_sendq_setting_reaches_each_client(start_server, joined):
    server = start_server(sendq=8192)
    joined("alice", server)
    assert [client.sendq_bytes for client in server._connected] == [8192]


# --- Room size ---

def test_full_room_refuses_a_newcomer_and_keeps_serving(start_server, connect, joined):
    server = start_server(max_clients=2)
    alice = joined("alice", server)
    waiting = connect(server)  # a connection at the prompt counts too
    extra = connect(server)
    assert extra.expect_closed() == ["*** The room is full (2 connected). Try again later."]
    waiting.close()
    wait_until(lambda: server.places_taken() == 1, message="the place to be freed")
    joined("bob", server)
    alice.expect_next("bob joined")


def test_a_connection_whose_socket_options_fail_gives_its_place_back(
        start_server, connect, joined, monkeypatch):
    """macOS refuses socket options (EINVAL) on a connection reset before its
    thread set them up: the place must not stay taken."""
    server = start_server(max_clients=1)

    def reset_already(sock):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(chat_server, "enable_keepalive", reset_already)
    connect(server).expect_closed()
    wait_until(lambda: server.places_taken() == 0, message="the place to be freed")
    monkeypatch.undo()
    joined("alice", server)


# --- History ---

def test_late_joiner_sees_recent_history(room, joined):
    alice, bob = room("alice", "bob")
    alice.send("first")
    bob.expect_next("alice says: first")
    carol = joined("carol")
    assert "alice says: first" in carol.seen
    assert "*** bob joined the chat." in carol.seen


def test_history_keeps_only_the_last_events(start_server, room, joined):
    server = start_server(history=2)
    alice, bob = room("alice", "bob", target=server)
    for word in ("one", "two", "three"):
        alice.send(word)
        bob.expect_next("says: " + word)
    carol = joined("carol", server)
    said = [line for line in carol.seen if " says: " in line]
    assert said == ["alice says: two", "alice says: three"]


def test_history_holds_every_line_of_lines_that_arrived_together(room, joined):
    """Lines read at once go out as one room event; each is in the history."""
    alice, bob = room("alice", "bob")
    alice.send_raw(b"one\r\ntwo\r\nthree\r\n")  # one packet: one read
    for word in ("one", "two", "three"):
        bob.expect_next("alice says: " + word)
    carol = joined("carol")
    said = [line for line in carol.seen if " says: " in line]
    assert said == ["alice says: one", "alice says: two", "alice says: three"]


def test_history_zero_replays_nothing(start_server, room, joined):
    server = start_server(history=0)
    alice, bob = room("alice", "bob", target=server)
    alice.send("secret before you came")
    bob.expect_next("secret")
    carol = joined("carol", server)
    assert not any("says:" in line for line in carol.seen)
    assert not any("What was said before" in line for line in carol.seen)  # no empty header


def test_history_never_holds_private_messages(room, joined):
    alice, bob = room("alice", "bob")
    alice.send("/msg bob psst")
    bob.expect_next("alice whispers: psst")
    carol = joined("carol")
    assert not any("psst" in line for line in carol.seen)


# --- Connections ---

def test_accepted_sockets_use_keepalive_to_find_vanished_peers():
    sock = socket.socket()
    try:
        enable_keepalive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * probes <= 150  # SPEC: within about two minutes
    finally:
        sock.close()


def test_accepted_connection_sends_at_once_and_uses_keepalive(server, joined):
    joined("alice")
    sock = server_side(server, "alice").sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                == chat_server.KEEPALIVE_IDLE_SECONDS)


def test_a_whole_class_connecting_at_once_all_get_a_prompt(start_server, connect):
    server = start_server(max_clients=300, per_address=0)  # all from 127.0.0.1
    assert server.request_queue_size >= 100  # not socketserver's 5
    students = [connect(server) for _ in range(100)]
    for student in students:
        student.expect("What is your name?")


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_host_double_colon_serves_ipv6_and_ipv4(start_server_at):
    try:
        server = start_server_at("::")
    except OSError as error:
        pytest.skip("cannot listen on [::]: %s" % error)
    port = server.server_address[1]
    for address in (("::1", port), ("127.0.0.1", port)):
        try:
            client = ChatClient(address)
        except OSError as error:
            pytest.skip("cannot connect to %s: %s" % (address, error))
        try:
            client.expect("What is your name?")
        finally:
            client.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="needs TCP_USER_TIMEOUT")
def test_a_connection_the_os_gives_up_on_leaves_without_a_name_timeout(
        start_server, room, joined, caplog, monkeypatch):
    """The kernel's own timeout on a student who stopped reading is not "no name in time"."""
    monkeypatch.setattr(chat_server, "UNACKED_SECONDS", 0.5)  # TCP_USER_TIMEOUT: not minutes
    server = start_server(flood_rate=0, sendq=1 << 24, max_line=BIG_LINE_BYTES)
    alice, bob = room("alice", "bob", target=server)
    slow = joined("slow", server, rcvbuf=4096)  # joins, then never reads
    alice.expect_next("slow joined")
    bob.expect_next("slow joined")
    line = "x" * BIG_LINE_BYTES  # more than slow's window: the rest waits in the
    bob.send(line)                # kernel's send buffer, with no writer thread
    alice.expect_next(line)
    alice.expect_next(SLOW_LEFT, timeout=TIMEOUT + 5)
    line = expect_console(caplog, "Closed connection: slow")
    assert not [l for l in caplog.messages if "in time" in l], caplog.messages[-5:]
    assert line.startswith("Closed connection: slow (127.0.0.1:")
    slow.close()
