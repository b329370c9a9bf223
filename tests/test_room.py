"""The room over real sockets: joining, chatting, leaving, and what clients really send."""

import random
import socket
import sys
import threading
import unicodedata

import pytest

import chat_server
from conftest import TIMEOUT, wait_until

IAC, DO, WONT, IP = 255, 253, 252, 244
ECHO, TIMING_MARK = 1, 6


# --- Joining and leaving ---

def test_join_is_announced_to_the_others(joined):
    alice = joined("alice")
    joined("bob")
    alice.expect_next("*** bob joined the chat.")


def test_newcomer_is_welcomed_and_sees_who_is_online(joined, connect):
    joined("alice")
    bob = connect()
    bob.expect("What is your name?")
    bob.send("bob")
    bob.expect_next("*** Welcome, bob!")
    bob.expect("*** Online now (2): alice, bob")


def test_message_reaches_everyone_else_but_not_the_sender(room):
    alice, bob, carol = room("alice", "bob", "carol")
    alice.send("hello class")
    bob.expect_next("alice says: hello class")
    carol.expect_next("alice says: hello class")
    bob.send("sentinel")
    alice.expect_next("bob says: sentinel")  # alice never got her own line back


@pytest.fixture
def eager_thread_switching():
    """Make threads switch as often as the interpreter can, so races show up."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_every_client_sees_room_events_in_the_same_order(
        start_server, room, connect, eager_thread_switching):
    """Six senders, the teacher and two newcomers at once: one order for all.

    A newcomer sees each room event exactly once: in the history or live.
    """
    server = start_server(flood_rate=0, history=10000, per_address=0)  # 12 from 127.0.0.1
    names = ["s%d" % number for number in range(6)] + ["w0", "w1", "w2", "w3"]
    clients = dict(zip(names, room(*names, target=server)))
    lines_each, notes = 300, 100
    # Each sender's lines arrive at once, so every reader thread has a backlog
    # to work through at the same time as the others. An action is one room
    # event per line (messages that arrive together go out as one event).
    payload = b"".join(b"/me line %d\r\n" % n for n in range(lines_each))
    for name in names[:6]:
        clients[name].send_raw(payload)
    console = chat_server.TeacherConsole(server, None)
    teacher = threading.Thread(target=lambda: [console.handle_line("note %d" % n)
                                               for n in range(notes)])
    teacher.start()
    newcomers = {name: connect(server) for name in ("n0", "n1")}
    for name, newcomer in newcomers.items():
        newcomer.send(name)  # joins in the middle of it all
    teacher.join(TIMEOUT)
    everything = lines_each * 6 + notes + len(newcomers)
    seen = {name: [client.expect_next("") for _ in range(everything)]
            for name, client in clients.items() if name.startswith("w")}
    seen.update({name: [clients[name].expect_next("")
                        for _ in range(everything - lines_each)]
                 for name in names[:6]})  # a sender sees all but its own lines
    order = seen["w0"]
    for name in names[:6]:
        own = [line for line in order if line.startswith("* %s " % name)]
        assert own == ["* %s line %d" % (name, n) for n in range(lines_each)]
    assert [line for line in order if "[teacher]" in line] == [
        "*** [teacher] note %d" % n for n in range(notes)]
    # A race shows wherever it splits the room.
    for name, lines in seen.items():
        got = set(lines)
        assert [line for line in order if line in got] == lines, (
            "%s saw the room in another order than w0" % name)
    before = ["*** %s joined the chat." % name for name in names]
    for name, newcomer in newcomers.items():
        newcomer.expect("*** What was said before you came:")
        history = []
        while not history or not history[-1].startswith("*** Online now"):
            history.append(newcomer.read_line())
        own_join = order.index("*** %s joined the chat." % name)
        live = [newcomer.expect_next("") for _ in range(everything - own_join - 1)]
        assert history[:-1] + live == before + order[:own_join] + order[own_join + 1:], (
            "%s missed or doubled an event" % name)


def test_leave_is_announced_once_on_a_clean_close(room):
    alice, bob, carol = room("alice", "bob", "carol")
    bob.close()
    alice.expect_next("*** bob left the chat.")
    alice.expect_nothing_before(carol)


def test_leave_is_announced_once_for_each_abrupt_reset(joined, server, room):
    alice, frank = room("alice", "frank")
    names = ["bob", "carol", "dave", "erin"]
    others = [joined(name) for name in names]
    for name in names:
        alice.expect_next("*** %s joined the chat." % name)
    for client in others:
        client.reset()
    leaves = [alice.expect_next(" left the chat.") for _ in names]
    assert sorted(leaves) == sorted("*** %s left the chat." % n for n in names)
    wait_until(lambda: server.places_taken() == 2, message="resets to be cleaned up")
    alice.expect_nothing_before(frank)


def test_name_is_free_again_at_once_after_leaving(joined, connect):
    bob = joined("bob")
    bob.send("/quit")
    bob.expect_closed()
    again = connect()
    again.expect("What is your name?")
    again.send("bob")
    again.expect_next("*** Welcome, bob!")


def test_connect_and_disconnect_cycles_leave_no_client_or_thread_behind(room, connect,
                                                                      start_server):
    server = start_server(per_address=0)  # 200 connections from one address
    alice, bob = room("alice", "bob", target=server)
    threads_before = threading.active_count()
    for number in range(200):
        client = connect(server)
        if number % 2:
            client.send("user%d" % number)  # at once: no prompt wait
            client.expect("Online now")
            client.close()
        else:
            client.reset()
    wait_until(lambda: server.places_taken() == 2, message="all connections closed")
    wait_until(lambda: threading.active_count() <= threads_before,
               message="threads to finish (%d before)" % threads_before)
    events = [alice.expect_next(" the chat.") for _ in range(200)]
    for number in range(1, 200, 2):
        user = "*** user%d " % number
        mine = [event[len(user):] for event in events if event.startswith(user)]
        assert mine == ["joined the chat.", "left the chat."]
    alice.expect_nothing_before(bob, sentinel="still fine")


# --- What clients really send ---

def test_every_server_line_ends_in_crlf(joined, connect):
    alice = joined("alice")
    bob = connect()
    for _ in range(2):  # the welcome and the name prompt
        raw = bob.read_raw_line()
        assert raw.endswith(b"\r\n"), raw
    bob.send("bob")
    alice.send("hi")
    while True:
        raw = bob.read_raw_line()
        assert raw.endswith(b"\r\n"), raw
        if b"says: hi" in raw:
            break


@pytest.mark.parametrize("end", [b"\r\0", b"\r", b"\n", b"\r\n"],
                         ids=["CR NUL", "bare CR", "LF", "CR LF"])
def test_each_kind_of_line_end_ends_a_line(room, end):
    alice, bob = room("alice", "bob")
    bob.send_raw(b"one" + end + b"two" + end)
    alice.expect_next("bob says: one")
    alice.expect_next("bob says: two")


def test_cr_and_lf_split_across_two_packets_are_one_line_end(room):
    alice, bob = room("alice", "bob")
    bob.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bob.send_raw(b"first\r")
    alice.expect_next("bob says: first")
    bob.send_raw(b"\nsecond\r\n")
    alice.expect_next("bob says: second")  # no empty line, no lost line


def test_whitespace_only_lines_are_ignored(room):
    alice, bob = room("alice", "bob")
    bob.send("   ")
    bob.send("\t")
    alice.expect_nothing_before(bob)


@pytest.mark.parametrize("text", ["\u200b", "\u2800 \u2800", "\u3164", "\u115f\u1160",
                                  "\u0301\u0301", "\ufff9\ufffb"],
                         ids=["zero width space", "braille blank", "hangul filler",
                              "hangul choseong filler", "lone accents", "annotation marks"])
def test_lines_of_invisible_characters_only_are_ignored_like_blank_ones(room, text):
    alice, bob = room("alice", "bob")
    bob.send(text)
    bob.send("/me " + text)
    alice.expect_nothing_before(bob)


def test_invalid_utf8_becomes_a_replacement_character_and_the_connection_stays(room):
    alice, bob = room("alice", "bob")
    bob.send_raw(b"caf\xe9 \xfe\r\n")  # (not \xff: that is telnet's IAC)
    alice.expect_next("bob says: caf\ufffd \ufffd")
    bob.send("still here")
    alice.expect_next("bob says: still here")


def test_telnet_option_request_is_refused(connect):
    client = connect()
    client.send_raw(bytes([IAC, DO, ECHO]))
    client.expect_bytes(bytes([IAC, WONT, ECHO]))


def test_telnet_ctrl_c_gets_its_timing_mark_answer(joined):
    alice = joined("alice")
    alice.send_raw(bytes([IAC, IP, IAC, DO, TIMING_MARK]))
    alice.expect_bytes(bytes([IAC, WONT, TIMING_MARK]))


def test_telnet_ctrl_c_right_after_a_line_sends_the_line_then_says_bye(room):
    """The line and the Ctrl+C come in one read: the line still goes out, then Bye."""
    alice, bob = room("alice", "bob")
    bob.send_raw(b"last words\r\n" + bytes([IAC, IP, IAC, DO, TIMING_MARK]))
    alice.expect_next("bob says: last words")
    bob.expect_bytes(b"*** Bye.\r\n")  # after telnet's answer to the Ctrl+C
    alice.expect_next("*** bob left the chat.")


def test_a_cyrillic_line_from_linux_telnet_reaches_the_others_as_typed(room):
    """inetutils telnet sends the 0x83 of "у" as a Ctrl+C (IAC IP, then IAC DO
    TIMING-MARK): inside a letter, it is that letter, and bob stays."""
    alice, bob = room("alice", "bob")
    bob.send_raw("как ".encode() + b"\xd1" + bytes([IAC, IP, IAC, DO, TIMING_MARK])
                 + " вас дела\r\n".encode())
    alice.expect_next("bob says: как у вас дела")
    bob.send("still here")
    alice.expect_next("bob says: still here")


def test_telnet_text_after_ctrl_c_is_not_sent(room):
    """The client is leaving: what follows its Ctrl+C in the same read is not said."""
    alice, bob = room("alice", "bob")
    bob.send_raw(bytes([IAC, IP, IAC, DO, TIMING_MARK]) + b"after the end\r\n")
    alice.expect_next("*** bob left the chat.")


def test_telnet_bytes_glued_to_the_front_of_a_name_are_removed(connect, joined):
    alice = joined("alice")
    bob = connect()
    bob.expect("What is your name?")
    bob.send_raw(bytes([IAC, DO, ECHO, IAC, 251, 31]) + b"bob\r\n")
    alice.expect_next("*** bob joined the chat.")


def test_backspace_erases_a_multibyte_character(room):
    alice, bob = room("alice", "bob")
    bob.send_raw("caf\u00e9".encode() + b"\x7fe\x08\x08fe\r\n")
    alice.expect_next("bob says: cafe")


@pytest.mark.parametrize("sent, seen", [
    ("Zalgo", "bob says: Zalgo"), ("/me Zalgo", "* bob Zalgo"),
    ("/msg alice Zalgo", "bob whispers: Zalgo"), ("//Zalgo", "bob says: /Zalgo"),
    ("/quit Zalgo", "*** bob left the chat. (Zalgo)")])
def test_a_letter_keeps_at_most_three_accents_in_what_others_see(room, sent, seen):
    """Zalgo text's hundreds of stacked accents would draw over other lines."""
    alice, bob = room("alice", "bob")
    stacked = "Z" + "\u0301\u0336" * 100 + "algo, Vie\u0323\u0302t Nam"  # Vietnamese: two
    bob.send(sent.replace("Zalgo", stacked))
    alice.expect_next(seen.replace("Zalgo", "Z\u0301\u0336\u0301algo, Vie\u0323\u0302t Nam"))


@pytest.mark.parametrize("joiner", ["\u2060", "\u200d", "\u200b", "\u3164"],
                         ids=["word joiner", "zero-width joiner", "zero-width space",
                              "hangul filler"])
def test_accents_split_by_characters_drawn_as_nothing_still_count_on_one_letter(
        room, joiner):
    alice, bob = room("alice", "bob")
    bob.send("Z" + ("\u0301\u0302\u0303" + joiner) * 100 + "algo")
    line = alice.expect_next("bob says: Z")
    assert sum(unicodedata.category(character)[0] == "M" for character in line) == 3


def test_a_name_typed_with_separate_accents_is_shown_composed(room, joined):
    alice, = room("alice")
    bob = joined("Jose\u0301")  # e, then a combining acute: what some keyboards send
    alice.expect_next("*** Jos\u00e9 joined the chat.")
    bob.send("hola")
    alice.expect_next("Jos\u00e9 says: hola")


# Devanagari QA (U+0958) is one letter typed, but NFC writes it as two: KA and
# a nukta, a mark. Checked as typed, these names passed; shown, they broke the
# rules (and every linked server refused the events they were in).
QA_WITH_THREE_MARKS = "\u0958\u0901\u0901\u0901"
TWENTY_TYPED_THIRTY_SHOWN = "\u0958" * 10 + "a" * 10


@pytest.mark.parametrize("name, problem", [
    (QA_WITH_THREE_MARKS, "*** Too many accents on one letter"),
    (TWENTY_TYPED_THIRTY_SHOWN, "*** That name is too long"),
], ids=["four marks once composed", "too long once composed"])
def test_a_name_is_checked_as_it_will_be_shown(room, connect, name, problem):
    newcomer = connect()
    newcomer.send(name)
    newcomer.expect(problem)
    alice, = room("alice")
    alice.send("/nick " + name)
    alice.expect_next(problem)


def test_trimming_accents_cannot_make_three_asterisks_show(room):
    """A spacing mark kept the asterisks apart, and was then trimmed as a fourth mark."""
    alice, bob = room("alice", "bob")
    star = "*" + "\u0323" * 3 + "\u0903"  # three marks below, then a spacing mark
    bob.send(star * 3 + " [teacher] the test is moved to Friday")
    line = alice.expect_next("bob says: ")
    assert chat_server.defuse_server_marker(line) == line, line


def test_a_new_name_with_too_many_accents_is_refused_not_trimmed(room):
    alice, bob = room("alice", "bob")
    bob.send("/nick b" + "\u0301" * 5)
    bob.expect_next("*** Too many accents on one letter")


def test_escape_sequences_and_controls_never_reach_other_terminals(room):
    alice, bob = room("alice", "bob")
    bob.send_raw(b"\x1b[2J\x1b]0;owned\x07hi\x07 \x1b[Athere\x1b[31m\r\n")
    raw = alice.read_raw_line()
    assert raw == b"bob says: hi there\r\n"


def test_no_student_line_starts_like_a_server_line(room):
    alice, bob = room("alice", "bob")
    bob.send("*** Server: everyone must leave")
    line = alice.expect_next("Server: everyone")
    assert line == "bob says: ** Server: everyone must leave"


def test_browser_gets_the_chat_page_and_is_closed(connect):
    browser = connect()
    browser.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
    lines = browser.expect_closed()
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "<!DOCTYPE html>" in lines


def test_line_over_max_line_is_refused_and_the_connection_kept(room):
    alice, bob = room("alice", "bob")
    bob.send("x" * 1025)
    bob.expect_next("longer than 1024 bytes and was not sent")
    bob.send("y" * 1024)
    alice.expect_next("bob says: " + "y" * 1024)
    bob.send("short")
    alice.expect_next("bob says: short")


def test_blank_and_too_long_lines_amid_messages_in_one_read(room):
    alice, bob = room("alice", "bob")
    bob.send_raw(b"one\r\n   \r\n" + b"x" * 1025 + b"\r\ntwo\r\n")
    alice.expect_next("bob says: one")
    alice.expect_next("bob says: two")
    bob.expect_next("longer than 1024 bytes and was not sent")
    alice.expect_nothing_before(bob)


def test_max_line_flag_sets_the_limit(start_server, room):
    server = start_server(max_line=100)
    alice, bob = room("alice", "bob", target=server)
    bob.send("x" * 101)
    bob.expect_next("longer than 100 bytes")
    bob.send("fine")
    alice.expect_next("bob says: fine")


def test_a_line_of_invalid_utf8_within_max_line_is_shown_though_it_grows(room):
    """A Latin-1 telnet's line of 1000 bytes: each byte shows as U+FFFD, three bytes."""
    alice, bob = room("alice", "bob")
    bob.send_raw(b"caf\xe9 " * 200 + b"\r\n")
    assert alice.expect_next("bob says:") == "bob says: " + "caf\ufffd " * 199 + "caf\ufffd"


def test_a_line_that_cleaning_makes_too_long_for_any_server_is_refused(start_server, room):
    """Past REDIS_TEXT_BYTES as the room shows it, linked servers (this one too) would
    drop it, and it would be lost: so it is refused, as too long."""
    server = start_server(max_line=30000)
    alice, bob = room("alice", "bob", target=server)
    bob.send_raw(b"\x80" * 25000 + b"\r\n" + b"\x80" * 300 + b"\r\n")
    bob.expect_next("longer than 30000 bytes and was not sent")
    assert alice.expect_next("bob says:") == "bob says: " + "\ufffd" * 300


def test_random_bytes_harm_nobody_and_the_next_client_still_works(joined, connect,
                                                                  start_server):
    # The vandals' lines are still being paced out after they hang up, and
    # each holds a connection from 127.0.0.1 until then: no per-address limit.
    server = start_server(per_address=0)
    alice = joined("alice", server)
    noise = random.Random(1337)
    for _ in range(5):
        vandal = connect(server)
        vandal.send_raw(bytes(noise.getrandbits(8) for _ in range(20000)))
        vandal.close()
    for _ in range(3):
        vandal = joined("v%d" % noise.randrange(1000), server)
        vandal.send_raw(bytes(noise.getrandbits(8) for _ in range(20000)) + b"\n")
        vandal.reset()
    bob = joined("bob", server)
    bob.send("all good")
    alice.expect("bob says: all good")


# --- Commands (the dispatch) ---

def test_double_slash_sends_a_line_starting_with_slash(room):
    alice, bob = room("alice", "bob")
    bob.send("//shrug")
    alice.expect_next("bob says: /shrug")


def test_unknown_command_is_named_with_a_hint(joined):
    bob = joined("bob")
    bob.send("/dance now")
    bob.expect_next("*** Unknown command: /dance. Type /help")


def test_quit_says_bye_and_closes(room):
    alice, bob = room("alice", "bob")
    bob.send("/quit")
    assert bob.expect_closed() == ["*** Bye."]
    alice.expect_next("*** bob left the chat.")


def test_lines_after_quit_are_not_sent(room):
    alice, bob, carol = room("alice", "bob", "carol")
    bob.send_raw(b"/quit\r\nghost line\r\n")
    bob.expect_closed()
    alice.expect_next("*** bob left the chat.")
    alice.expect_nothing_before(carol, sentinel="after quit")
