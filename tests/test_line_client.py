"""python chat_server.py --connect: the built-in client, run as a real process."""

import os
import signal
import socket
import subprocess
import sys
import types

import pytest

import chat_server
from conftest import SERVER_SCRIPT, TIMEOUT, wait_until
from test_process import CTRL_C_LAUNCHER


def start_client(server, *, stdin_text=None, prefix=()):
    """Start the line client against server, typing stdin_text; stdin stays open.

    prefix: Python flags, e.g. ("-c", launcher code that then runs the script).
    """
    host, port = server.server_address[:2]
    env = dict(os.environ, LC_ALL="C", LANG="C")  # no UTF-8 locale: the client must cope
    env.pop("PYTHONIOENCODING", None)
    process = subprocess.Popen(
        [sys.executable, *prefix, SERVER_SCRIPT, "--connect", "%s:%d" % (host, port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    if stdin_text is not None:
        process.stdin.write(stdin_text.encode("utf-8"))
        process.stdin.flush()
    return process


def finish(process):
    """Close the client's stdin, wait for it to exit; return (status, stdout, stderr)."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail("the client did not exit: %r" % stdout)
    return process.returncode, stdout.decode("utf-8"), stderr.decode("utf-8")


def test_client_sends_stdin_and_prints_the_server_then_exits_0_at_eof(joined, server):
    bob = joined("bob")
    process = start_client(server, stdin_text="alice\nhello from a pipe\n")
    bob.expect_next("*** alice joined the chat.")
    bob.expect_next("alice says: hello from a pipe")
    status, stdout, stderr = finish(process)
    assert status == 0 and stderr == ""
    assert "*** Welcome, alice!" in stdout
    assert "\r" not in stdout  # CR LF from the server becomes the OS's line end


def test_client_speaks_utf8_both_ways_whatever_the_locale(joined, server):
    bob = joined("bob")
    process = start_client(server)
    process.stdin.write("Zoë\ncafé ☕\n".encode("utf-8"))
    process.stdin.flush()
    bob.expect_next("*** Zoë joined the chat.")
    bob.expect_next("Zoë says: café ☕")
    bob.send("merci, Zoë ✓")
    bob.send("/quit")
    bob.expect_closed()
    status, stdout, _ = finish(process)
    assert "bob says: merci, Zoë ✓" in stdout


def test_client_prints_lines_as_they_arrive_and_exits_0_when_the_server_closes(joined, server):
    process = start_client(server)  # stdin stays open: the student is "typing"
    process.stdin.write(b"alice\n")
    process.stdin.flush()
    wait_until(lambda: "alice" in server.who(), message="alice to join")
    server.close_room()
    wait_until(lambda: process.poll() is not None, message="the client to exit by itself")
    status, stdout, stderr = finish(process)
    assert status == 0 and "Traceback" not in stderr
    assert stdout.rstrip().endswith("*** Server is shutting down.")


def test_client_prints_bye_and_exits_0_after_quit(server):
    process = start_client(server, stdin_text="alice\n/quit\n")
    status, stdout, _ = finish(process)
    assert status == 0
    assert stdout.rstrip().endswith("*** Bye.")


def client_of_a_fake_server(sent):
    """Run the client against a fake server that sends the bytes sent, then closes;
    return (status, stdout, stderr)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        process = start_client(types.SimpleNamespace(server_address=listener.getsockname()))
        connection, _ = listener.accept()
        with connection:
            connection.sendall(sent)
    return finish(process)


def test_client_prints_a_last_line_that_has_no_line_end():
    """What a server sent before it closed mid-line (it was killed, say) is shown."""
    status, stdout, _ = client_of_a_fake_server(b"*** first line\r\n*** cut off mid-li")
    assert status == 0
    assert stdout.splitlines() == ["*** first line", "*** cut off mid-li"]


def test_client_never_passes_a_servers_escape_sequences_to_the_terminal():
    """A classmate's fake server cannot clear the screen, retitle the window or ring."""
    status, stdout, _ = client_of_a_fake_server(
        b"\x1b[2J\x1b]0;owned\x07hello\x07\r\nbye\x1b[31m")
    assert status == 0 and stdout.splitlines() == ["hello", "bye"]


def test_client_shows_a_line_with_no_end_in_sight_in_pieces():
    """A server gone wrong, sending a megabyte with no line end: shown as it comes,
    in pieces, not held (and searched again at every read) until it ends."""
    status, stdout, _ = client_of_a_fake_server(b"x" * (1024 * 1024) + b"\r\n*** after\r\n")
    lines = stdout.splitlines()
    assert status == 0 and lines[-1] == "*** after"
    assert "".join(lines[:-1]) == "x" * (1024 * 1024)
    assert len(lines) > 2


def test_client_refused_address_is_one_clear_line_and_exit_1():
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()  # nothing listens there now
    finished = subprocess.run(
        [sys.executable, SERVER_SCRIPT, "--connect", "127.0.0.1:%d" % port],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
    )
    assert finished.returncode == 1
    stderr = finished.stderr.decode()
    assert stderr.startswith("Cannot connect to 127.0.0.1:%d" % port)
    assert stderr.count("\n") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="sending Ctrl+C is not portable")
def test_client_ctrl_c_exits_0_without_a_traceback(joined, server):
    bob = joined("bob")
    process = start_client(server, prefix=("-c", CTRL_C_LAUNCHER))
    process.stdin.write(b"alice\n")
    process.stdin.flush()
    bob.expect_next("alice joined")
    process.send_signal(signal.SIGINT)
    status, _, stderr = finish(process)
    assert status == 0 and "Traceback" not in stderr
    bob.expect_next("*** alice left the chat.")


# Ctrl+C as the client starts its second thread (as in a loaded run, when the
# student's name is sent and answered before the main thread is back).
CTRL_C_AT_START_LAUNCHER = CTRL_C_LAUNCHER.replace("sys.argv = ", """threading = __import__('threading')
start, started = threading.Thread.start, []
def start_then_ctrl_c(thread):
    start(thread)
    started.append(thread)
    if len(started) == 2:  # the client's two threads: stdin's is the second
        signal.raise_signal(signal.SIGINT)
threading.Thread.start = start_then_ctrl_c
sys.argv = """)


@pytest.mark.skipif(sys.platform == "win32", reason="sending Ctrl+C is not portable")
def test_client_ctrl_c_as_it_starts_exits_0_without_a_traceback(server):
    status, _, stderr = finish(start_client(server, prefix=("-c", CTRL_C_AT_START_LAUNCHER)))
    assert status == 0 and "Traceback" not in stderr, (status, stderr)


# Ctrl+C while the client is still connecting (a wrong lab address, a slow name lookup).
CTRL_C_CONNECTING_LAUNCHER = CTRL_C_LAUNCHER.replace("sys.argv = ", """socket = __import__('socket')
connect = socket.create_connection
def connect_after_ctrl_c(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)
    return connect(*args, **kwargs)
socket.create_connection = connect_after_ctrl_c
sys.argv = """)


@pytest.mark.skipif(sys.platform == "win32", reason="sending Ctrl+C is not portable")
def test_client_ctrl_c_while_connecting_exits_0_without_a_traceback(server):
    status, _, stderr = finish(start_client(server, prefix=("-c", CTRL_C_CONNECTING_LAUNCHER)))
    assert status == 0 and "Traceback" not in stderr, (status, stderr)


@pytest.mark.parametrize(
    "text, address",
    [("example.org", ("example.org", 1337)), ("example.org:42", ("example.org", 42)),
     ("10.0.0.5:4000", ("10.0.0.5", 4000)), ("[::1]:42", ("::1", 42)), ("::1", ("::1", 1337)),
     ("[fe80::1]", ("fe80::1", 1337))],
)
def test_connect_address_takes_a_port_or_defaults_to_1337(text, address):
    assert chat_server.split_host_port(text) == address


@pytest.mark.parametrize("text", ["host:port", "host:99999", ":42"])
def test_bad_connect_address_is_exit_status_2(text, capsys):
    """Checked in-process; the test below runs one as a real process."""
    with pytest.raises(SystemExit) as exited:
        chat_server.parse_args(["--connect", text])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_connect_address_ends_the_process_with_exit_status_2():
    finished = subprocess.run(
        [sys.executable, SERVER_SCRIPT, "--connect", "host:port"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
    )
    assert finished.returncode == 2
    assert finished.stderr.decode().count("\n") == 1
