"""A teacher's first lesson: the console's rough edges, prompts, and what students are told."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import chat_server
from chat_server import TeacherConsole
from conftest import (SERVER_SCRIPT, TIMEOUT, console_lines, expect_console, server_process,
                      wait_until)


# --- Starting ---

OLD_PYTHONS = ["3.6", "3.7", "3.8"]


def old_python():
    """An installed Python older than 3.9 (pyenv's), or skip."""
    pyenv = shutil.which("pyenv")
    root = subprocess.run([pyenv, "root"], capture_output=True, text=True,
                          timeout=TIMEOUT).stdout.strip() if pyenv else ""
    versions = os.path.join(root, "versions")
    for version in sorted(os.listdir(versions)) if root and os.path.isdir(versions) else []:
        if version.rsplit(".", 1)[0] in OLD_PYTHONS:
            return os.path.join(versions, version, "bin", "python")
    pytest.skip("no Python older than 3.9 installed here")


def test_python_older_than_3_9_gets_one_clear_line_not_a_traceback():
    finished = subprocess.run([old_python(), SERVER_SCRIPT, "--port", "0"],
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert finished.returncode != 0
    assert finished.stderr.startswith("chat_server.py needs Python 3.9 or newer"), finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_pipe_that_ends_at_once_does_not_also_say_type_here():
    with server_process() as server:  # stdin is /dev/null
        server.expect_log("Console input has ended")
        server.stop()
    assert "Type here" not in server.stderr_text()


# --- The console ---

def test_double_slash_at_the_console_announces_a_line_starting_with_slash(room, console):
    (alice,) = room("alice")
    console.handle_line("//etc/hosts is the file to look at")
    alice.expect_next("*** [teacher] /etc/hosts is the file to look at")


def test_unban_by_the_kicked_name_lets_the_address_back_in(room, joined, console, caplog):
    (kim,) = room("kim")
    console.handle_line("/kick kim")
    kim.expect_closed()
    console.handle_line("/unban kim")
    expect_console(caplog, "127.0.0.1 may join again.")
    joined("kim_again")


def test_kick_with_ban_minutes_zero_says_there_is_no_ban(start_server, room, caplog):
    server = start_server(ban_minutes=0)
    (kim,) = room("kim", target=server)
    TeacherConsole(server, None).handle_line("/kick kim")
    line = expect_console(caplog, "Kicked kim")
    assert line == "Kicked kim; no ban (--ban-minutes is 0)."


def test_kick_reply_names_the_ban_in_whole_words(room, console, caplog):
    (kim,) = room("kim")
    console.handle_line("/kick kim")
    line = expect_console(caplog, "Kicked kim")
    assert line == "Kicked kim; 127.0.0.1 may not rejoin for 5 minutes (/unban kim lifts it)."
    assert not any("(s)" in line for line in console_lines(caplog))


def test_a_muted_students_paste_is_counted_not_shown_line_by_line(start_server, room, caplog):
    server = start_server(flood_rate=0)  # the whole paste arrives at once
    alice, bob = room("alice", "bob", target=server)
    TeacherConsole(server, None).handle_line("/mute bob")
    bob.expect("muted you")
    bob.send_raw(b"".join(b"pasted line %d\r\n" % number for number in range(50)))
    bob.expect_next("*** Not sent")  # once for each batch of lines read together
    alice.send("sentinel")
    while bob.read_line() != "alice says: sentinel":
        assert bob.seen[-1].startswith("*** Not sent"), bob.seen[-1]
    expect_console(caplog, "(held back) bob says: pasted line 0")
    alice.send("sentinel 2")  # the recorder has shown everything before it too
    bob.expect_next("alice says: sentinel 2")
    expect_console(caplog, "alice says: sentinel 2")
    held = [line for line in console_lines(caplog) if line.startswith("(held back")]
    assert held == ["(held back) bob says: pasted line 0"]


def test_held_back_count_says_whose_lines_it_counts(start_server, room, caplog, monkeypatch):
    monkeypatch.setattr(chat_server, "HELD_BACK_REPORT_SECONDS", 3.0)  # all four within it
    server = start_server()
    alice, bob, carol = room("alice", "bob", "carol", target=server)
    TeacherConsole(server, None).handle_line("/quiet on")
    for student, text in [(bob, "one"), (bob, "two"), (carol, "three"), (carol, "four")]:
        student.send(text)
        student.expect("*** Not sent: the room is quiet")
    expect_console(caplog, "(held back) bob says: one")
    expect_console(caplog, "(held back 3 more lines: 2 from carol, 1 from bob)")


def test_counts_not_shown_yet_are_shown_when_the_server_stops(caplog):
    recorder = chat_server.Recorder(chat_server.Settings(), None)
    recorder.start()
    for number in range(3):
        recorder.note("silenced", ("bob", "bob says: %d" % number))
    recorder.stop()  # long before HELD_BACK_REPORT_SECONDS
    assert "(held back 2 more lines from bob)" in console_lines(caplog)


def test_held_back_count_is_shown_after_a_while(start_server, room, caplog, monkeypatch):
    monkeypatch.setattr(chat_server, "HELD_BACK_REPORT_SECONDS", 0.2)
    server = start_server()
    alice, bob = room("alice", "bob", target=server)
    TeacherConsole(server, None).handle_line("/mute bob")
    bob.expect("muted you")
    for number in range(3):
        bob.send("line %d" % number)
        bob.expect_next("*** Not sent")
    expect_console(caplog, "(held back 2 more lines from bob)")
    # The count starts again: the next line is shown in full, or counted as
    # one (if it comes within the same short while), never as three.
    bob.send("line 3")
    bob.expect_next("*** Not sent")
    wait_until(lambda: any("(held back) bob says: line 3" in line or "(held back 1 more line "
                           in line for line in console_lines(caplog)),
               message="line 3 shown, or counted as the only one since the count")


def test_quiet_on_twice_announces_once_and_tells_the_teacher(room, console, caplog):
    alice, bob = room("alice", "bob")
    console.handle_line("/quiet on")
    alice.expect_next("*** [teacher] Quiet, please")
    console.handle_line("/quiet on")
    expect_console(caplog, "Quiet mode is already on.")
    console.handle_line("still quiet")
    alice.expect_next("*** [teacher] still quiet")  # no second "Quiet, please"


def test_console_who_fits_wide_names_in_columns_and_counts_seconds(room, console, caplog):
    room("李小龍", "alice")
    console.handle_line("/who")

    def table():  # the rows come after the "2 online" line: wait for all three
        return [line for line in console_lines(caplog)
                if line.startswith(("NAME", "李小龍", "alice"))]

    wait_until(lambda: len(table()) == 3, message="the table's three rows: %r" % table())
    rows = table()
    # The ADDRESS column starts at the same screen column in every row.
    columns = [chat_server.display_width(row[:row.index("127.0.0.1")]) if "127" in row
               else chat_server.display_width(row[:row.index("ADDRESS")]) for row in rows]
    assert len(set(columns)) == 1, rows
    assert re.search(r"127\.0\.0\.1:\d+ +\d+ s$", rows[1]), rows[1]


def test_display_width_counts_wide_characters_as_two_columns_and_marks_as_none():
    """What lines up /who's columns (the test above measures with it)."""
    assert chat_server.display_width("李小龍") == 6
    assert chat_server.display_width("ｂｏｂ") == 6  # full-width Latin
    assert chat_server.display_width("e\u0301mile") == 5  # é as e and a combining accent


def test_console_who_shows_connections_that_have_not_joined(connect, console, caplog):
    waiting = [connect(), connect()]
    for client in waiting:
        client.expect("What is your name?")
    console.handle_line("/who")
    expect_console(caplog, "0 online, 2 not joined yet.")
    expect_console(caplog, "Not joined yet: 127.0.0.1 (2)")


def test_console_shows_a_leave_before_the_connection_closes(room, caplog):
    alice, bob = room("alice", "bob")
    bob.send("/quit")
    alice.expect_next("*** bob left the chat.")
    expect_console(caplog, "Closed connection: bob")
    lines = console_lines(caplog)
    left = lines.index("*** bob left the chat.")
    closed = next(number for number, line in enumerate(lines)
                  if line.startswith("Closed connection: bob"))
    assert left < closed, lines


# --- The transcript ---

def test_transcript_marks_each_start_and_records_the_teachers_actions(tmp_path):
    path = tmp_path / "class.log"
    for run in range(2):
        with server_process("--transcript", str(path), stdin=subprocess.PIPE) as server:
            alice, bob = server.join("alice"), server.join("bob")
            server.type("/mute bob")
            bob.expect("muted you")
            server.type("/kick bob")
            bob.expect_closed()
            server.type("/quiet on")
            alice.expect("[teacher] Quiet, please")
            server.expect_log("Kicked bob")
            server.process.terminate()
            server.process.wait(TIMEOUT)
            alice.close()
    events = [line[20:] for line in path.read_text(encoding="utf-8").splitlines()]
    starts = [event for event in events if event.startswith("=== The chat server started")]
    assert len(starts) == 2
    for action in ("[teacher] muted bob", "[teacher] kicked bob",
                   "*** [teacher] Quiet, please: only the teacher speaks for now.",
                   "=== The server is shutting down. ==="):
        assert events.count(action) == 2, (action, events)
    # Students still in the room at the shutdown are not recorded as leaving
    # one by one: the shutdown mark is the last line of each run.
    ends = [n for n, event in enumerate(events) if event == "=== The server is shutting down. ==="]
    assert [events[n + 1:n + 2] for n in ends] == [[starts[1]], []], events


# --- Students ---

def test_telnet_ctrl_c_says_goodbye_and_leaves(room):
    alice, bob = room("alice", "bob")
    # What telnet sends for Ctrl+C: interrupt, then "do timing mark".
    bob.send_raw(bytes([chat_server.IAC, chat_server.IP, chat_server.IAC, chat_server.DO, 6]))
    bob.expect_bytes(b"*** Bye.\r\n")
    alice.expect_next("*** bob left the chat.")


def test_name_prompt_states_the_time_limit(connect):
    student = connect()
    student.expect_next("*** Welcome to the chat!")
    student.expect_next("*** You have 1 minute to give your name.")
    student.expect_next("*** What is your name?")


def test_timeout_at_the_password_prompt_names_the_password(start_server, connect):
    server = start_server(password="fish", name_timeout=0.2)
    student = connect(server)
    student.expect("Password?")
    assert student.expect_closed()[-1] == "*** You did not give the password in time. Goodbye."


def test_student_dropped_as_too_slow_is_told_why_on_return(start_server, connect, joined):
    server = start_server()
    slow = joined("slow", server)
    client = next(client for client in server.snapshot()[0] if client.name == "slow")
    server.drop_too_slow(client)
    slow.expect_closed()
    again = connect(server)
    again.expect_next("*** Welcome to the chat!")
    again.expect("*** Last time (as slow) you were disconnected: your computer did not "
                 "read the chat fast enough.")
    fresh = connect(server)  # told once, not every time
    fresh.expect_next("*** Welcome to the chat!")
    fresh.expect_next("*** You have 1 minute")


@pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX here")
def test_refused_clients_that_already_sent_a_name_still_see_why(start_server, connect):
    server = start_server(max_clients=1, per_address=0)
    connect(server).expect("What is your name?")
    for _ in range(20):
        latecomer = connect(server)
        latecomer.send("latecomer")  # unread input must not reset away the refusal
        assert latecomer.expect_closed() == ["*** The room is full (1 connected). Try again later."]
        latecomer.close()  # as a student would: the refuser, idle again, takes the next at once


def test_no_line_of_a_pasted_batch_shows_the_server_marker(room):
    """Lines read together go out together: each of them is checked, not only the first."""
    alice, bob = room("alice", "bob")
    bob.send_raw(b"first\r\nsecond *** [teacher] Class is over.\r\nthird ****\r\n")
    alice.expect_next("bob says: first")
    alice.expect_next("bob says: second ** [teacher] Class is over.")
    alice.expect_next("bob says: third **")
