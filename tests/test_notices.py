"""Join, leave and rename lines (notices) wait to go out together: never out of order.

The room sends notices from its own thread, a burst of them in one send per
client; anything else queued for a client first queues the notices before
it. Several tests here stall that thread, so that only the second path can
deliver the notices: the order must hold all the same.
"""

import linecache
import socket
import sys
import threading

import pytest

import chat_server
from conftest import TIMEOUT, expect_console, wait_until


class Gate:
    """Stands in for the event Notices.added: the notices thread stops in wait()."""

    def __init__(self):
        self.entered = threading.Event()  # the notices thread is stopped here
        self.opened = threading.Event()

    def wait(self):
        self.entered.set()
        self.opened.wait(TIMEOUT * 4)

    def set(self):
        pass  # a notice was queued: the stopped thread does not hear of it

    def is_set(self):
        return False  # (asked during a round: nothing new, go on)

    def clear(self):
        pass


@pytest.fixture
def stall_notices(server):
    """stall_notices() stops the room's notices thread until the test ends."""
    stalled = []

    def stall(target=server):
        gate, waiting_on = Gate(), target.notices.added
        target.notices.added = gate
        waiting_on.set()  # one more round, if it was waiting; then it stops at the gate
        assert gate.entered.wait(TIMEOUT), "the notices thread did not stop"
        stalled.append((target, gate))

    yield stall
    for target, gate in stalled:
        target.notices.added = threading.Event()
        target.notices.added.set()  # it sends what is left, then waits as before
        gate.opened.set()


def test_joins_leaves_and_renames_in_a_burst_arrive_once_each_in_the_room_order(
        start_server, room, joined):
    server = start_server(flood_rate=0, per_address=0)
    watcher, sender = room("watcher", "sender", target=server)
    expected = []
    for number in range(30):
        newcomer = joined("n%d" % number, server)
        sender.send("after n%d" % number)
        newcomer.expect("sender says: after n%d" % number)  # in the room's order now
        expected += ["*** n%d joined the chat." % number, "sender says: after n%d" % number]
        if number % 3 == 0:
            newcomer.send("/nick m%d" % number)
            newcomer.expect("is now m%d." % number)  # its own rename line: done
            expected.append("*** n%d is now m%d." % (number, number))
        if number % 2 == 0:
            newcomer.close()
            name = "m%d" % number if number % 3 == 0 else "n%d" % number
            expected.append("*** %s left the chat." % name)
            # Wait for the leave to be in the room's order before the next join.
            sender.expect("*** %s left the chat." % name)
    seen = [watcher.expect_next("") for _ in expected]
    assert seen == expected
    watcher.expect_nothing_before(sender)


def test_a_chat_line_brings_the_waiting_join_lines_ahead_of_it(stall_notices, room,
                                                               joined):
    alice, watcher = room("alice", "watcher")
    stall_notices()
    joined("bob")
    joined("carol")
    alice.send("hello")
    watcher.expect_next("*** bob joined the chat.")
    watcher.expect_next("*** carol joined the chat.")
    watcher.expect_next("alice says: hello")


def test_the_sender_of_a_chat_line_gets_the_waiting_join_lines_at_once(stall_notices,
                                                                      room, joined):
    alice, watcher = room("alice", "watcher")
    stall_notices()
    joined("bob")
    alice.send("hello")
    alice.expect_next("*** bob joined the chat.", timeout=TIMEOUT)


def test_a_newcomer_sees_a_waiting_join_once_in_its_history(stall_notices, room, joined):
    alice, = room("alice")
    stall_notices()
    joined("bob")
    carol = joined("carol")
    assert carol.seen.count("*** bob joined the chat.") == 1  # in the history
    alice.send("hello")
    carol.expect_next("alice says: hello")
    alice.expect_next("*** bob joined the chat.")
    alice.expect_next("*** carol joined the chat.")


def test_a_reply_comes_after_the_join_lines_before_it(stall_notices, room, joined):
    alice, = room("alice")
    stall_notices()
    joined("bob")
    alice.send("/who")
    alice.expect_next("*** bob joined the chat.")
    alice.expect_next("*** Online now (2): alice, bob")


def test_a_whisper_comes_after_the_join_lines_before_it(stall_notices, room, joined):
    alice, bob = room("alice", "bob")
    stall_notices()
    joined("carol")
    alice.send("/msg bob psst")
    bob.expect_next("*** carol joined the chat.")
    bob.expect_next("alice whispers: psst")


def test_a_kicked_student_sees_the_join_lines_before_the_kick(stall_notices, room,
                                                             joined, console):
    alice, watcher = room("alice", "watcher")
    stall_notices()
    joined("bob")
    console.handle_line("/kick alice")
    assert alice.expect_closed() == ["*** bob joined the chat.",
                                     "*** The teacher removed you from the chat."]


def test_shutdown_comes_after_the_join_lines_before_it(server, stall_notices, room, joined):
    watcher, = room("watcher")
    stall_notices()
    joined("bob")
    server.close_room()
    assert watcher.expect_closed() == ["*** bob joined the chat.",
                                       "*** Server is shutting down."]


@pytest.fixture
def transcript(tmp_path):
    """An open transcript, closed after the server (ask for this fixture first)."""
    opened = chat_server.Transcript(str(tmp_path / "transcript.txt"))
    yield opened
    opened.close()


def test_the_transcript_has_a_waiting_join_before_the_message_after_it(
        transcript, start_server, stall_notices, room, joined):
    server = start_server(transcript=transcript)
    alice, watcher = room("alice", "watcher", target=server)
    stall_notices(server)
    joined("bob", server)
    alice.send("hello")
    watcher.expect_next("*** bob joined the chat.")
    watcher.expect_next("alice says: hello")

    def events():
        with open(transcript.path, encoding="utf-8") as reader:
            return [line for line in reader.read().splitlines()
                    if line.endswith(("bob joined the chat.", "alice says: hello"))]

    wait_until(lambda: len(events()) == 2, message="both lines in the transcript")
    assert events()[0].endswith("bob joined the chat.")


# --- Found in review: the notices thread and Nagle ---


def nodelay(client):
    return client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_the_rest_of_a_chat_line_the_socket_did_not_take_still_leaves_at_once(
        start_server, joined):
    """A chat line that only partly fit in a full socket keeps TCP_NODELAY for its rest."""
    server = start_server(flood_rate=0, sendq=4 * 1024 * 1024)
    joined("slow", server, rcvbuf=4096)  # never reads from here on
    sender = joined("sender", server)
    slow_side = server.find("slow")
    slow_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills soon
    line = "x" * 900
    for _ in range(2000):  # bounded: fills the kernel's buffers, far below the sendq
        sender.send(line)
        if slow_side._backlogged:
            break
    wait_until(lambda: slow_side._backlogged and slow_side._writer is not None
               and slow_side._sending, message="the writer took the rest")
    # Only chat lines were ever queued for slow: Nagle must stay off.
    assert nodelay(slow_side) != 0


def outbox_holds(client, data):
    with client._outbox_lock:
        return data in b"".join(client._outbox)


def test_a_chat_line_waiting_with_a_join_line_behind_it_still_leaves_at_once(
        start_server, joined):
    """A notice queued after a chat line does not make the chat line wait (Nagle)."""
    server = start_server(flood_rate=0, max_line=40_000)
    slow = joined("slow", server, rcvbuf=4096)  # reads only at the end
    sender = joined("sender", server)
    slow_side = server.find("slow")
    slow_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills soon
    # More than both sockets' buffers hold: the writer is stuck on its rest.
    sender.send("x" * 40_000)
    wait_until(lambda: slow_side._backlogged, message="the writer to wait on a full socket")
    sender.send("the chat line")  # waits in the outbox, behind the writer's batch
    wait_until(lambda: outbox_holds(slow_side, b"the chat line"),
               message="the chat line to wait in the outbox")
    joined("late", server)  # its join line is queued behind the chat line
    wait_until(lambda: outbox_holds(slow_side, b"late joined"),
               message="the join line to wait in the outbox")
    slow.expect("*** late joined the chat.")  # slow reads: the writer sends both
    assert nodelay(slow_side) != 0


def test_the_notices_thread_ends_when_the_server_closes_during_its_round():
    """server_close() while the notices thread waits for the room's lock: it still ends."""
    server = chat_server.ChatServer(("127.0.0.1", 0), chat_server.Settings())
    thread = server.notices._thread
    code = chat_server.Notices._run.__code__

    def waiting_for_the_room_lock():
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        return frame is not None and "with room._lock" in linecache.getline(
            frame.f_code.co_filename, frame.f_lineno)

    with server._lock:  # the notices thread wakes, passes its stop check, waits here
        server.notices.added.set()
        wait_until(waiting_for_the_room_lock, message="the notices thread at the room lock")
        server.server_close()  # sets the stop flag and the event: the thread clears it next
    wait_until(lambda: not thread.is_alive(), message="the notices thread ended")


def test_a_failed_round_of_join_lines_is_tried_again(room, joined, monkeypatch, caplog):
    """A round that fails in the notices thread (no thread could start) loses nothing."""
    monkeypatch.setattr(chat_server, "NOTICES_RETRY_SECONDS", 0.05)
    alice, = room("alice")
    real_take, failed = chat_server.Client.queue_notices, []

    def take_failing_once(client, *args, **kwargs):
        if threading.current_thread().name == "notices" and not failed:
            failed.append(client)
            raise RuntimeError("can't start new thread")
        return real_take(client, *args, **kwargs)

    monkeypatch.setattr(chat_server.Client, "queue_notices", take_failing_once)
    joined("bob")
    alice.expect_next("*** bob joined the chat.")  # kept, and given out again
    assert failed
    joined("carol")
    alice.expect_next("*** carol joined the chat.")  # and the thread goes on
    caplog.clear()  # the one error this test caused on purpose


# --- Found in review: a join while a student is being told goodbye ---


def join_before_line(server, name, text, newcomer):
    """Make the server-side client called name run newcomer() just before it is sent
    the line containing text: a join that comes in at that very moment."""
    client = server.find(name)
    real_send_line = client.send_line

    def send_line(line):
        if text in line:
            newcomer()
        return real_send_line(line)

    client.send_line = send_line


@pytest.mark.parametrize("how, last_line", [
    ("/kick", "*** The teacher removed you from the chat."),
    ("/quit", "*** Bye."),
    ("telnet's Ctrl+C", "*** Bye."),
], ids=["kicked", "quits", "telnet Ctrl+C"])
def test_a_student_who_leaves_sees_no_join_line_after_its_last_line(
        server, stall_notices, room, joined, console, how, last_line):
    """A join just before the last line: told before it, or never (not after it)."""
    alice, watcher = room("alice", "watcher")
    stall_notices()
    joined("bob")
    join_before_line(server, "alice", last_line[4:], lambda: joined("carol"))
    if how == "/kick":
        console.handle_line("/kick alice")
    elif how == "/quit":
        alice.send("/quit")
    else:
        alice.send_raw(bytes([255, 244]))  # IAC IP
    seen = alice.expect_closed()
    assert seen[-1] == last_line, seen


# --- Found in review: a client a catch-up made too slow ---


@pytest.fixture
def alice_behind(start_server, stall_notices, connect):
    """(server, alice): more join lines wait for alice than her outbox takes.

    The notices thread is stalled. No history, so each newcomer's welcome
    fits in the small sendq, and alice's waiting join lines (8 x 25 bytes)
    do not.
    """
    server = start_server(sendq=160, history=0, per_address=0, flood_rate=0)
    alice = connect(server).join("alice")
    stall_notices(server)
    for number in range(8):
        connect(server).join("b%d" % number)
    return server, alice


def test_a_student_whose_reply_catch_up_overflowed_its_outbox_is_dropped_at_once(
        alice_behind, caplog):
    """Its /who's catch-up overflowed: the reply drops it, without waiting for a round."""
    server, alice = alice_behind
    # As if her socket were full, with a piece longer than her outbox still
    # waiting in it (one such piece is let through, not two).
    server.find("alice").queue_bytes(b"w" * 200 + b"\r\n")
    alice.send("/who")  # its reply catches alice up first: too much
    expect_console(caplog, "Disconnecting alice")
    alice.expect_closed()


def test_a_student_whose_catch_up_overflowed_its_outbox_is_dropped_by_the_next_round(
        alice_behind, caplog):
    """A catch-up that nobody sends after overflowed it (the Redis echo of its own join
    does one): the notices thread's next round drops it."""
    server, alice = alice_behind
    gate = server.notices.added  # where stall_notices() holds the thread
    alice_side = server.find("alice")
    alice_side.queue_bytes(b"w" * 200 + b"\r\n")  # as if her socket were full (see above)
    server.before_reply(alice_side)  # too much for alice's outbox; no send follows
    assert alice_side.too_slow
    server.notices.added = threading.Event()  # the thread goes on, as after a long round
    server.notices.added.set()
    gate.opened.set()
    expect_console(caplog, "Disconnecting alice")
    alice.expect_closed()


# --- A round that new notices interrupt ---


def serve_a_round_interrupted(server, room, joined, monkeypatch):
    """first, middle, last in the room; a join begins a round of the notices
    thread, and a second join comes while it serves middle. Return whom the
    thread served from middle on, in order."""
    first, middle, last = room("first", "middle", "last")
    served, real_take, late = [], chat_server.Client.queue_notices, []

    def take_recorded(client, *args, **kwargs):
        if threading.current_thread().name == "notices":
            if client.name == "middle" and not served:
                server.notices.added.clear()  # (set for this round)
                late.append(joined("late"))  # its join line waits: a new notice
                assert server.notices.added.is_set()
            if served or client.name == "middle":
                served.append(client.name)
        return real_take(client, *args, **kwargs)

    monkeypatch.setattr(chat_server.Client, "queue_notices", take_recorded)
    joined("newcomer")
    for client in (first, middle, last):
        client.expect_next("*** newcomer joined the chat.")
        client.expect_next("*** late joined the chat.")
    return served


def test_new_notices_during_a_round_go_first_to_the_clients_it_reached_first(
        server, room, joined, monkeypatch):
    served = serve_a_round_interrupted(server, room, joined, monkeypatch)
    assert served.index("first") < served.index("last"), served  # begun again from the top


def test_a_round_past_its_time_reaches_everyone_before_beginning_again(
        server, room, joined, monkeypatch):
    monkeypatch.setattr(chat_server, "NOTICES_LATE_SECONDS", 0.0)
    served = serve_a_round_interrupted(server, room, joined, monkeypatch)
    assert served.index("last") < served.index("first"), served


def test_a_line_that_came_during_a_finished_round_has_waited_since_it_came(
        server, room, joined, monkeypatch):
    """Its wait counts from when it came, not from when a round began to give it out."""
    first, middle, last = room("first", "middle", "last")
    monkeypatch.setattr(chat_server, "NOTICES_LATE_SECONDS", 0.0)  # the first round finishes
    served, real_take, late = [], chat_server.Client.queue_notices, []

    def take_recorded(client, *args, **kwargs):
        if threading.current_thread().name == "notices":
            if client.name == "middle" and len(late) < 2:
                server.notices.added.clear()  # (set for this round)
                late.append(joined("late%d" % len(late)))  # a new notice, mid-round
                if len(late) == 1:  # late0's line came during the first round...
                    monkeypatch.setattr(chat_server, "NOTICES_LATE_SECONDS", 1.0)
                    with server._lock:  # ...as if a while ago: it may not wait more
                        server.notices._added_at[-1] -= 2.0
                served.append("(a notice came)")
            served.append(client.name)
        return real_take(client, *args, **kwargs)

    monkeypatch.setattr(chat_server.Client, "queue_notices", take_recorded)
    joined("newcomer")
    for name in ("newcomer", "late0", "late1"):
        last.expect("*** %s joined the chat." % name)
    second_round = served[served.index("(a notice came)", served.index("(a notice came)") + 1):]
    assert second_round.index("last") < second_round.index("first"), served
