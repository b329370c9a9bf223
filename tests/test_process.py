"""chat_server.py as a real process: banner, flags, start-up errors, Ctrl+C."""

import signal
import socket
import subprocess
import sys
import time
import types
import warnings

import pytest

import chat_server
from conftest import SERVER_SCRIPT, TIMEOUT, console_lines, server_process

POSIX_SIGNALS = pytest.mark.skipif(
    sys.platform == "win32", reason="sending Ctrl+C to a child process is not portable"
)


def run_server(*flags):
    """Run chat_server.py to completion; return (exit status, stderr text)."""
    finished = subprocess.run(
        [sys.executable, SERVER_SCRIPT, *flags], stdin=subprocess.DEVNULL,
        capture_output=True, timeout=3 * TIMEOUT,  # a Python start on a loaded machine
    )
    return finished.returncode, finished.stderr.decode("utf-8", "replace")


def test_banner_says_where_it_listens_and_how_to_join():
    with server_process() as server:
        server.expect_log("Students join at 127.0.0.1 with:")
        server.expect_log("  a browser:  http://127.0.0.1:%d/" % server.port)
        server.expect_log("  nc 127.0.0.1 %d   or   telnet 127.0.0.1 %d" % (server.port,
                                                                          server.port))
        server.expect_log("  python chat_server.py --connect 127.0.0.1:%d" % server.port)
        server.expect_log("Password: off")
        server.expect_log("Transcript: off")
        server.expect_log("Only this computer can join")


def test_banner_fits_80_columns_and_keeps_the_teachers_flags_in_its_hint(tmp_path):
    """All but the password, which the class may see on a projected console."""
    transcript = tmp_path / "class log.txt"
    with server_process("--password", "fish", "--transcript", str(transcript)) as server:
        server.expect_log("Password: on")
        server.expect_log("Transcript: %s" % transcript)
        hint = server.expect_log("python chat_server.py --port")
        server.expect_log("(and your --password, not shown here)")
        server.stop()
    assert hint.endswith("python chat_server.py --port %d --host 0.0.0.0 --transcript '%s'"
                         % (server.port, transcript))  # the port it got, not 0
    assert "fish" not in server.stderr_text()
    banner = [line for line in server.stderr_text().split("Only this computer")[0].splitlines()
              if str(transcript) not in line]  # only a long path may be longer
    assert all(len(line) <= 80 for line in banner), banner


def test_banner_hint_hides_the_password_in_a_redis_address_too(caplog):
    url = "redis://:sesame@127.0.0.1:6379/lab"
    settings = chat_server.Settings(password="fish", redis=chat_server.redis_url_flag(url))
    server = types.SimpleNamespace(server_address=("127.0.0.1", 1337), settings=settings)
    chat_server.announce_address(server, None, ["--password", "fish", "--redis", url])
    lines = console_lines(caplog)
    assert "  python chat_server.py --host 0.0.0.0" in lines
    assert "  (and your --password and --redis, not shown here)" in lines
    assert not [line for line in lines if "fish" in line or "sesame" in line]


def test_an_abbreviated_flag_is_refused_so_the_banner_never_shows_its_value():
    status, stderr = run_server("--pass", "fish")  # argparse would take it for --password
    assert status == 2
    assert "unrecognized arguments: --pass fish" in stderr


def test_banner_on_all_interfaces_shows_an_address_other_computers_can_use():
    with server_process("--host", "0.0.0.0") as server:
        line = server.expect_log("Students join at ", timeout=TIMEOUT)
        server.stop()
    address = line.split("Students join at ")[1].split()[0]
    if address == "ADDRESS":  # no network at all: then it says how to find it
        assert "ip addr" in server.stderr_text()
    else:
        assert not address.startswith("127."), line  # not Debian's 127.0.1.1


def test_port_in_use_is_one_clear_line_and_exit_status_2():
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        status, stderr = run_server("--port", str(port))
    finally:
        holder.close()
    assert status == 2
    assert stderr.count("\n") == 1, stderr
    assert "Port %d is already in use" % port in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("host", ["no.such.host.invalid", "192.0.2.1"],
                         ids=["unknown name", "address not on this machine"])
def test_host_it_cannot_listen_on_is_one_clear_line_and_exit_status_2(host):
    status, stderr = run_server("--port", "0", "--host", host)
    assert status == 2
    assert stderr.count("\n") == 1 and "Cannot listen on" in stderr, stderr


@pytest.mark.parametrize(
    "flags",
    [["--port", "http"], ["--port", "70000"], ["--max-clients", "0"],
     ["--flood-rate", "-1"], ["--sendq", "ten"], ["--history", "-3"],
     ["--name-timeout", "nan"], ["--name-timeout", "3000000"], ["--ban-minutes", "1e308"],
     ["--flood-rate", "inf"], ["--password", " fish"], ["--password", "fish "],
     ["--password", "a\tb"], ["--password", "x" * 1100], ["--password", ""], ["--bogus"]],
    ids=["port not a number", "port too big", "no clients", "negative rate",
         "sendq not a number", "negative history", "nan timeout",
         "timeout past the OS timers", "endless ban", "endless rate",
         "password space first", "password space last", "password tab",
         "password past max-line", "empty password", "unknown flag"],
)
def test_bad_flag_value_is_one_clear_line_and_exit_status_2(flags, capsys):
    """Checked in-process (a process per flag costs a quarter second each);
    the test below runs one as a real process."""
    with pytest.raises(SystemExit) as exited:
        chat_server.parse_args(flags)
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert stderr.count("\n") == 1 and "error:" in stderr, stderr


def test_an_empty_chat_password_means_no_password(monkeypatch):
    monkeypatch.setenv("CHAT_PASSWORD", "")
    assert chat_server.parse_args([]).password == ""


def test_chat_password_is_the_password_when_the_flag_is_left_out(monkeypatch):
    monkeypatch.setenv("CHAT_PASSWORD", "fish")
    assert chat_server.parse_args([]).password == "fish"


def test_bad_flag_value_ends_the_process_with_one_clear_line_and_exit_status_2():
    status, stderr = run_server("--port", "http")
    assert status == 2
    assert stderr.count("\n") == 1 and "error:" in stderr, stderr


SPEC_DEFAULTS = [
    ("--max-line", "max_line", 1024),
    ("--flood-rate", "flood_rate", 5),
    ("--flood-burst", "flood_burst", 10),
    ("--nick-rate", "nick_rate", 3),
    ("--max-clients", "max_clients", 256),
    ("--name-timeout", "name_timeout", 60),
    ("--sendq", "sendq", 262144),
    ("--history", "history", 20),
    ("--ban-minutes", "ban_minutes", 5),
]


@pytest.mark.parametrize("flag, field, default", SPEC_DEFAULTS, ids=[f for f, _, _ in SPEC_DEFAULTS])
def test_limit_flag_has_the_default_that_spec_gives(flag, field, default):
    assert getattr(chat_server.settings_from(chat_server.parse_args([])), field) == default


@pytest.mark.parametrize("flag, field, default", SPEC_DEFAULTS, ids=[f for f, _, _ in SPEC_DEFAULTS])
def test_limit_flag_sets_the_room_setting(flag, field, default):
    settings = chat_server.settings_from(chat_server.parse_args([flag, str(default * 2)]))
    assert getattr(settings, field) == default * 2


@pytest.mark.parametrize("flag, field", [
    ("--flood-rate", "flood_rate"), ("--nick-rate", "nick_rate"),
    ("--name-timeout", "name_timeout"), ("--history", "history"),
    ("--ban-minutes", "ban_minutes"),
])
def test_zero_turns_a_limit_off_and_is_accepted(flag, field):
    settings = chat_server.settings_from(chat_server.parse_args([flag, "0"]))
    assert getattr(settings, field) == 0


def test_fractional_ban_minutes_are_accepted():
    settings = chat_server.settings_from(chat_server.parse_args(["--ban-minutes", "0.5"]))
    assert settings.ban_minutes == 0.5


def test_default_address_is_the_tutorials():
    args = chat_server.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 1337)


# A shell without job control starts background jobs with Ctrl+C ignored, and
# Python leaves it ignored: a test run started that way gives the server the
# handler it has in a terminal.
CTRL_C_LAUNCHER = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@POSIX_SIGNALS
def test_ctrl_c_tells_everyone_and_exits_0_quickly_despite_a_stalled_client():
    with server_process("--flood-rate", "0", "--sendq", "100000000",
                        "--max-line", "100000", launcher=CTRL_C_LAUNCHER) as server:
        process = server.process
        alice = server.join("alice")
        stalled = server.client(rcvbuf=4096)
        stalled.send("stalled")  # joins, then never reads
        alice.expect_next("stalled joined")
        bob = server.join("bob")
        alice.expect_next("bob joined")
        for _ in range(80):  # 8 MB: the stalled client's socket buffers fill up
            bob.send("z" * 100_000)  # (few lines: little for the console to show)
            alice.expect_next("bob says: z")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        status = process.wait(TIMEOUT)
        took = time.monotonic() - started
        stderr = server.stderr_text()
        alice.expect_next("*** Server is shutting down.")
        bob.expect_next("*** Server is shutting down.")
        for client in (alice, bob, stalled):
            client.close()
    assert status == 0
    assert took < 2.5, "took %.1f s" % took  # SPEC: about two seconds
    assert "Traceback" not in stderr
    assert "Closed connection: stalled" in stderr  # by the server, not by its exit


@POSIX_SIGNALS
def test_sigterm_shuts_down_in_good_order():
    with server_process("--max-clients", "1") as server:
        alice = server.join("alice")
        # A signal that lands while the main thread is still starting alice's
        # thread makes socketserver close her socket (a known race, left to
        # the server): a refusal, sent by the main thread, shows it is done.
        latecomer = server.client()
        latecomer.send("bob")  # speaks first: answered at once, not after the browser wait
        refusal = latecomer.expect_closed()
        assert len(refusal) == 1 and "room is full" in refusal[0], refusal
        server.process.terminate()
        status = server.process.wait(TIMEOUT)
        alice.expect_next("*** Server is shutting down.")
        alice.close()
    assert status == 0


def joined_alone(server):
    """alice, joined to a server started with --max-clients 1; the main thread
    has finished starting her thread (see test_sigterm_shuts_down_in_good_order())."""
    alice = server.join("alice")
    latecomer = server.client()
    latecomer.send("bob")
    assert "room is full" in latecomer.expect_closed()[0]
    return alice


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_closing_the_terminal_tells_everyone_goodbye():
    """SIGHUP: the teacher closed the terminal window, or their SSH session ended."""
    with server_process("--max-clients", "1") as server:
        alice = joined_alone(server)
        server.process.send_signal(signal.SIGHUP)
        status = server.process.wait(TIMEOUT)
        alice.expect_next("*** Server is shutting down.")
        alice.close()
    assert status == 0


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_closing_the_terminal_during_the_goodbye_does_not_cut_it_short():
    """Ctrl+C, then the window is closed at once: a stalled client keeps the
    goodbye going for a moment, and the SIGHUP lands in it."""
    with server_process("--flood-rate", "0", "--sendq", "100000000", "--max-line", "100000",
                        launcher=CTRL_C_LAUNCHER) as server:
        alice = server.join("alice")
        stalled = server.client(rcvbuf=4096)
        stalled.send("stalled")  # joins, then never reads
        alice.expect_next("stalled joined")
        for _ in range(80):  # 8 MB: the stalled client's socket buffers fill up
            alice.send("z" * 100_000)
        server.expect_log("alice says: z")
        server.process.send_signal(signal.SIGINT)
        server.expect_log("Shutting down")
        server.process.send_signal(signal.SIGHUP)
        status = server.process.wait(TIMEOUT)
        stderr = server.stderr_text()
        stalled.close()
    assert status == 0, stderr
    assert "Stopped at once" not in stderr


NOHUP_LAUNCHER = (
    "import runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_under_nohup_the_server_outlives_its_terminal():
    with server_process("--max-clients", "2", launcher=NOHUP_LAUNCHER) as server:
        alice = server.join("alice")
        server.process.send_signal(signal.SIGHUP)
        server.join("bob")  # the room still admits, and tells alice
        alice.expect_next("*** bob joined the chat.")
        assert server.process.poll() is None


# Presses Ctrl+C while chat_server.py imports its modules (at "import ipaddress").
CTRL_C_AT_START_LAUNCHER = (
    "import os, runpy, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "class CtrlC:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'ipaddress':\n"
    "            os.kill(os.getpid(), signal.SIGINT)\n"
    "sys.meta_path.insert(0, CtrlC())\n"
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@POSIX_SIGNALS
def test_ctrl_c_while_the_server_starts_shows_no_traceback():
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_AT_START_LAUNCHER, SERVER_SCRIPT, "--port", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.communicate(timeout=TIMEOUT)[0].decode("utf-8", "replace")
    assert process.returncode == -signal.SIGINT  # ended by it, as the OS ends a program
    assert "Traceback" not in output, output


def test_server_with_stdin_at_eof_keeps_serving():
    with server_process() as server:  # stdin is /dev/null
        alice = server.client()
        alice.send("alice")
        alice.expect("*** Welcome, alice!")
        alice.close()
        server.expect_log("Closed connection: alice")
        assert server.process.poll() is None


# Runs the server with at most 40 open files, as a stingy OS would.
FEW_FILES_LAUNCHER = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.skipif(sys.platform == "win32", reason="open-file limits are POSIX")
def test_too_many_open_files_is_logged_and_survived():
    with server_process("--max-clients", "500", "--per-address", "0",
                        launcher=FEW_FILES_LAUNCHER) as server:
        crowd = []
        try:
            for number in range(50):  # more than 40 files: the last ones wait
                client = server.client()
                client.send("s%d" % number)
                crowd.append(client)
            server.expect_log("Too many open files")
            for client in crowd[:20]:
                client.close()
            crowd[-1].expect("*** Welcome, s49!")  # let in once files were freed
        finally:
            for client in crowd:
                client.close()
        assert server.process.poll() is None
    assert "Traceback" not in server.stderr_text()


def test_the_file_compiles_without_a_warning():
    """An invalid escape (the page's script is in a Python string) warns today,
    and newer Pythons make such warnings errors."""
    with open(SERVER_SCRIPT, encoding="utf-8") as source:
        text = source.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(text, SERVER_SCRIPT, "exec")
