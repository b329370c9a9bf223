"""Browser students: the page over HTTP and the room over a WebSocket, on the chat port.

Real sockets on 127.0.0.1; the WebSocket side is tests/websocket_client.py.
"""

import base64
import contextlib
import hashlib
import logging
import re
import socket
import struct
import time
import tracemalloc

import pytest

import chat_server
from conftest import TIMEOUT, ChatClient, console_lines, expect_console, wait_until
from websocket_client import (BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, ChatSocket,
                              HandshakeFailed, frame)


@pytest.fixture
def browser(server):
    """A factory: browser() opens a WebSocket to the chat (ChatSocket); all closed after."""
    with contextlib.ExitStack() as stack:

        def open_socket(target=None, **options):
            host, port = (target or server).server_address[:2]
            sock = ChatSocket(host, port, **options)
            stack.callback(sock.shutdown)
            return sock

        yield open_socket


@pytest.fixture
def bob_and_alice(browser, joined):
    """bob joined over TCP, alice in a browser; bob has read alice's join line."""
    bob = joined("bob")
    alice = browser().join("alice")
    bob.expect("*** alice joined the chat.")
    return bob, alice


def http(address, request, timeout=TIMEOUT):
    """Send raw request bytes; return (status line, headers dict, body) once closed."""
    with socket.create_connection(address[:2], timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, {name.lower(): value for name, value in headers.items()}, body


def get(server, path, method="GET", extra=""):
    request = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (method, path, extra)
    return http(server.server_address, request.encode("latin-1"))


def csp_source(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def teacher(server, line):
    """Type a line at the teacher's console (the console's commands, not their methods)."""
    chat_server.TeacherConsole(server, None).handle_line(line)


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- HTTP answers ---


def test_page_is_served_as_utf8_html_with_careful_headers(server):
    status, headers, body = get(server, "/")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert body.startswith(b"<!DOCTYPE html>")


def test_csp_allows_exactly_the_pages_own_inline_script_and_style(server):
    _, headers, body = get(server, "/")
    page = body.decode("utf-8")
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert headers["content-security-policy"] == (
        "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
        "img-src 'self'; frame-ancestors 'none'" % (csp_source(script), csp_source(style)))


def test_page_fetches_nothing_from_elsewhere_and_inserts_text_only(server):
    page = get(server, "/")[2].decode("utf-8")
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert "document.write" not in page
    assert "textContent" in page
    assert 'href="/chat_server.py"' in page


def test_source_file_downloads_as_this_very_file(server):
    status, headers, body = get(server, "/chat_server.py")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-disposition"] == 'attachment; filename="chat_server.py"'
    with open(chat_server.__file__, "rb") as source:
        assert body == source.read()


def test_a_spare_connection_after_the_page_is_answered_in_http_seconds_later(server):
    """Chromium opens spare connections with the page, and may send a reload on one
    seconds later: greeted by then, it could not be answered, and the page would fail."""
    assert get(server, "/")[0] == "HTTP/1.1 200 OK"
    with socket.create_connection(server.server_address[:2], timeout=TIMEOUT) as spare:
        spare.settimeout(4 * chat_server.BROWSER_WAIT_SECONDS)
        with pytest.raises(socket.timeout):
            spare.recv(1)  # the behaviour under test: no greeting all that while
        spare.settimeout(TIMEOUT)
        spare.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert spare.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_icon_every_browser_asks_for_gets_404_and_no_console_line(server, caplog):
    status, _, _ = get(server, "/favicon.ico")
    assert status == "HTTP/1.1 404 Not Found"
    get(server, "/nothing")  # noted on the console after the icon's request
    expect_console(caplog, "no page at '/nothing'")
    assert not [line for line in console_lines(caplog) if "favicon" in line]


def test_other_paths_get_404(server):
    status, headers, body = get(server, "/etc/passwd")
    assert status == "HTTP/1.1 404 Not Found"
    assert headers["x-content-type-options"] == "nosniff"


def test_the_page_asked_for_by_a_name_that_is_not_ours_says_to_use_the_address(server):
    """A school's DNS name: its WebSocket would be refused (DNS rebinding), so
    the student is told at once what to open instead, not left disconnected."""
    port = server.server_address[1]
    request = "GET / HTTP/1.1\r\nHost: chat.lab:%d\r\n\r\n" % port
    status, _, body = http(server.server_address, request.encode("latin-1"))
    assert status == "HTTP/1.1 421 Misdirected Request"
    assert "does not answer to the name chat.lab:%d" % port in body.decode()
    assert "Open http://127.0.0.1:%d/ instead." % port in body.decode()


def test_the_named_address_is_one_a_browser_can_open_and_the_name_is_shown_clean():
    """Served on "::", an IPv4 student reached ::ffff:10.0.0.5; and the Host
    header is the browser's text, which the console shows too."""
    request = chat_server.parse_request_head(
        b"GET / HTTP/1.1\r\nHost: \x1b]0;pwned\x07\x1b[2Jevil\r\n\r\n")
    with pytest.raises(chat_server.BadRequest) as refused:
        chat_server.route_request(request, ("::ffff:10.0.0.5", 1337))
    assert refused.value.status == 421
    assert "Open http://10.0.0.5:1337/ instead." in refused.value.reason
    assert "\x1b" not in refused.value.reason and "\x07" not in refused.value.reason


def test_a_request_without_a_host_header_still_gets_the_page(server):
    status, headers, _ = http(server.server_address, b"GET / HTTP/1.0\r\n\r\n")
    assert status.endswith("200 OK") and headers["content-type"].startswith("text/html")


def test_query_string_does_not_change_the_page(server):
    assert get(server, "/?utm=1")[0] == "HTTP/1.1 200 OK"


def test_other_methods_get_405(server):
    assert get(server, "/", method="POST", extra="Content-Length: 0\r\n")[0] == (
        "HTTP/1.1 405 Method Not Allowed")


def test_websocket_path_without_upgrade_gets_426(server):
    status, headers, _ = get(server, "/chat")
    assert status == "HTTP/1.1 426 Upgrade Required"
    assert headers["sec-websocket-version"] == "13"


def test_head_with_a_line_over_8_kib_is_refused(server, caplog):
    status, _, _ = get(server, "/", extra="X-Big: %s\r\n" % ("x" * 8200))
    assert status.startswith("HTTP/1.1 431")


def test_head_with_over_100_header_lines_is_refused(server):
    extra = "".join("X-%d: 1\r\n" % number for number in range(101))
    assert get(server, "/", extra=extra)[0].startswith("HTTP/1.1 431")


def test_head_with_100_header_lines_is_answered(server):
    extra = "".join("X-%d: 1\r\n" % number for number in range(99))
    assert get(server, "/", extra=extra)[0] == "HTTP/1.1 200 OK"


def test_head_over_16_kib_in_all_is_refused(server):
    extra = "".join("X-%d: %s\r\n" % (number, "y" * 6000) for number in range(3))
    assert get(server, "/", extra=extra)[0].startswith("HTTP/1.1 431")


def test_unfinished_head_is_closed_at_the_deadline_even_without_a_name_timeout(
        start_server, monkeypatch):
    """--name-timeout 0 does not lift the head's own deadline."""
    monkeypatch.setattr(chat_server, "HTTP_HEAD_TIMEOUT_SECONDS", 0.2)
    server = start_server(name_timeout=0)
    started = time.monotonic()
    status, _, _ = http(server.server_address, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert status.startswith("HTTP/1.1 408")
    assert time.monotonic() - started < TIMEOUT


def test_late_http_request_is_closed_and_never_taken_as_a_password(
        start_server, caplog):
    """A preconnected socket sends its request after the first prompt went out."""
    server = start_server(password="secret")
    client = ChatClient(server.server_address)
    try:
        client.expect("Password?")
        client.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert client.expect_closed() == []  # no "Wrong password" line either
    finally:
        client.close()
    expect_console(caplog, "after the first prompt")  # logged by the recorder thread
    assert not any("Wrong password" in r.getMessage() for r in caplog.records)


def test_late_http_request_is_never_taken_as_a_name(connect, joined):
    watcher = joined("watcher")
    client = connect()
    client.expect("What is your name?")
    client.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert client.expect_closed() == []
    watcher.expect_nothing_before(joined("other"), sentinel="*** other joined")


def test_http_request_as_a_later_line_is_just_text(room):
    alice, bob = room("alice", "bob")
    bob.send("GET / HTTP/1.1")
    alice.expect_next("bob says: GET / HTTP/1.1")


# --- The WebSocket handshake ---


def test_websocket_handshake_then_welcome_and_name_prompt(browser):
    student = browser()
    student.expect("*** Welcome to the chat!")
    student.expect("*** What is your name?")


def test_upgrade_from_another_origin_is_refused(server):
    with pytest.raises(HandshakeFailed) as refused:
        ChatSocket(*server.server_address, headers={"Origin": "http://evil.example"})
    assert " 403 " in refused.value.status_line


def test_upgrade_with_a_foreign_host_name_is_refused(server):
    """DNS rebinding: a name that is not this machine's."""
    with pytest.raises(HandshakeFailed) as refused:
        ChatSocket(*server.server_address, origin=False,
                   headers={"Host": "evil.example:%d" % server.server_address[1]})
    assert " 403 " in refused.value.status_line


def test_upgrade_without_origin_from_localhost_is_accepted(server):
    student = ChatSocket(*server.server_address, origin=False,
                         headers={"Host": "localhost:%d" % server.server_address[1]})
    try:
        student.expect("What is your name?")
    finally:
        student.shutdown()


def test_upgrade_with_another_version_gets_426(server):
    with pytest.raises(HandshakeFailed) as refused:
        ChatSocket(*server.server_address, headers={"Sec-WebSocket-Version": "8"})
    assert " 426 " in refused.value.status_line
    assert "Sec-WebSocket-Version: 13" in refused.value.head


@pytest.mark.parametrize("key", ["short", base64.b64encode(b"k" * 17).decode()],
                         ids=["not-base64-of-16", "base64-of-17-bytes"])
def test_upgrade_with_a_bad_key_gets_400(server, key):
    """The key must be base64 of exactly 16 bytes (RFC 6455, 4.1)."""
    with pytest.raises(HandshakeFailed) as refused:
        ChatSocket(*server.server_address, headers={"Sec-WebSocket-Key": key})
    assert " 400 " in refused.value.status_line


# --- Frames ---


def test_browser_and_nc_students_talk_both_ways(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send("hello from the browser")
    bob.expect_next("alice says: hello from the browser")
    bob.send("hello from nc")
    alice.expect_next("bob says: hello from nc")


def test_browser_student_is_marked_as_such(server, browser, joined):
    browser().join("alice")
    joined("bob")
    vias = {client.name: client.via for client in server._connected}
    assert vias == {"alice": "browser", "bob": "tcp"}


def test_console_who_shows_who_joined_from_a_browser(browser, room, server, caplog):
    room("alice")
    browser().join("bob")
    chat_server.TeacherConsole(server, None).handle_line("/who")
    expect_console(caplog, "2 online, 0 not joined yet.")

    def table_rows():  # the table comes after that line: wait for both rows
        return {line.split()[0]: line for line in console_lines(caplog)
                if re.match(r"(alice|bob) +127\.0\.0\.1:", line)}

    wait_until(lambda: len(table_rows()) == 2, message="alice's and bob's rows")
    rows = table_rows()
    assert rows["bob"].endswith(" browser") and not rows["alice"].endswith(" browser")


def test_server_messages_carry_whole_lines_ending_in_crlf(browser):
    student = browser()
    student.send("alice")
    messages = []
    while not any("Online now" in message for message in messages):
        messages.append(student.recv_message())
    assert all(message.endswith("\r\n") for message in messages)


def test_fragmented_message_is_one_line(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send_frame(TEXT, b"one ", fin=False)
    alice.send_frame(CONTINUATION, b"two ", fin=False)
    alice.send_frame(CONTINUATION, b"three")
    bob.expect_next("alice says: one two three")


def test_ping_gets_pong_even_between_fragments(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send_frame(TEXT, b"half ", fin=False)
    alice.send_frame(PING, b"are you there")
    assert alice.recv_frame() == (True, PONG, b"are you there")
    alice.send_frame(CONTINUATION, b"and half")
    bob.expect_next("alice says: half and half")


def test_close_gets_close_and_the_others_see_a_leave(bob_and_alice):
    bob, alice = bob_and_alice
    alice.close(1000)
    alice.expect_close_code(1000)
    bob.expect_next("*** alice left the chat.")


def test_multibyte_text_and_0xff_bytes_pass_with_the_telnet_filter_off(bob_and_alice):
    """Masked with 0xFF, every byte would be a telnet IAC if the filter were on."""
    bob, alice = bob_and_alice
    alice.send_raw(frame(TEXT, "ÿé 漢字 ok".encode("utf-8"), key=b"\xff\xff\xff\xff"))
    bob.expect_next("alice says: ÿé 漢字 ok")


def test_message_over_max_line_gets_the_long_line_notice_and_stays(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send("x" * 1025)
    alice.expect("longer than 1024 bytes and was not sent")
    alice.send("short")
    bob.expect_next("alice says: short")


def test_message_with_several_lines_is_several_lines(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send("first\nsecond\n")
    bob.expect_next("alice says: first")
    bob.expect_next("alice says: second")


def test_a_browser_behind_on_reading_says_nothing_after_its_close_frame(
        start_server, room, browser):
    """Its close frame waits behind a backlog; the message right behind it is not sent."""
    server = start_server(flood_rate=0, max_line=40_000)
    alice, bob = room("alice", "bob", target=server)
    slow = browser(server, rcvbuf=4096).join("slow")  # reads only at the end
    bob.expect("slow joined")
    slow_side = server.find("slow")
    slow_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills soon
    alice.send("x" * 40_000)
    bob.expect_next("alice says: xxx")
    wait_until(lambda: slow_side._backlogged, message="slow's writer to wait on a full socket")
    slow.send_raw(frame(CLOSE, struct.pack("!H", 1000)) + frame(TEXT, b"after the close"))
    slow.expect_close_code(1000)  # it reads at last: the backlog, then the close
    bob.expect_next("*** slow left the chat.")


@pytest.mark.parametrize("bad_frame, code", [
    (frame(TEXT, b"unmasked", mask=False), 1002),
    (frame(BINARY, b"\x00\x01"), 1003),
    (frame(TEXT, b"bad \xff\xfe utf-8"), 1007),
    (frame(TEXT, b"reserved", rsv=0x40), 1002),
    (frame(0x3, b"no such opcode"), 1002),
    (frame(CONTINUATION, b"no start"), 1002),
    (frame(PING, b"x" * 126), 1002),
    (frame(PING, b"x", fin=False), 1002),
    (frame(CLOSE, b"\x03"), 1002),
    (frame(CLOSE, struct.pack("!H", 999)), 1002),
    (frame(CLOSE, struct.pack("!H", 1005)), 1002),
    (frame(CLOSE, struct.pack("!H", 2000)), 1002),
], ids=["unmasked", "binary", "bad-utf8", "rsv", "opcode", "continuation", "long-ping",
        "fragmented-ping", "one-byte-close", "close-code-999", "close-code-1005",
        "close-code-2000"])
def test_protocol_error_closes_with_its_code_and_one_console_line(
        joined, caplog, bad_frame, code, bob_and_alice):
    bob, alice = bob_and_alice
    before = len(warnings(caplog))
    alice.send_raw(bad_frame)
    alice.expect_close_code(code)
    bob.expect_next("*** alice left the chat.")
    expect_console(caplog, "Closed connection: alice")  # said after the warning
    problems = warnings(caplog)[before:]
    assert len(problems) == 1 and "WebSocket protocol error" in problems[0], problems
    bob.send("still here")  # nobody else was harmed
    joined("carol")
    bob.expect("carol joined")


def test_oversized_frame_is_refused_from_its_header_alone(browser):
    """Only the header of a 1 MiB frame is sent: the close must come without its body."""
    alice = browser().join("alice")
    alice.send_raw(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 20) + b"mask")
    alice.expect_close_code(1009)


def test_fragments_adding_up_past_the_limit_are_refused(browser):
    alice = browser().join("alice")
    limit = chat_server.websocket_message_limit(chat_server.Settings())
    alice.send_frame(TEXT, b"x" * (limit // 2), fin=False)
    alice.send_frame(CONTINUATION, b"x" * (limit // 2), fin=False)
    alice.send_frame(CONTINUATION, b"x")
    alice.expect_close_code(1009)


def test_the_message_limit_is_for_each_message_not_for_all_of_them(start_server, browser,
                                                                    joined):
    """Messages that together pass the limit, each well under it, keep the connection."""
    server = start_server(flood_rate=0)  # no pacing: the bytes arrive at once
    bob = joined("bob", server)
    alice = browser(server).join("alice")
    limit = chat_server.websocket_message_limit(server.settings)
    for _ in range(2):  # too long for a chat line (each is refused), not for a message
        alice.send("x" * (limit * 2 // 3))
        alice.expect("longer than 1024 bytes and was not sent")
    alice.send("still here")
    bob.expect("alice says: still here")


def test_message_limit_grows_with_max_line():
    assert chat_server.websocket_message_limit(chat_server.Settings(max_line=1024)) == 65536
    assert chat_server.websocket_message_limit(chat_server.Settings(max_line=100000)) == 400000


# --- A browser student in the room, next to an nc student ---


def test_both_kinds_see_the_same_events_in_the_same_order(joined, bob_and_alice):
    bob, alice = bob_and_alice
    carol = joined("carol")
    for student in (alice, bob):
        student.expect("carol joined")
    for number in range(5):
        (alice if number % 2 else carol).send("line %d" % number)
    expected = ["alice says: line 1", "carol says: line 0", "carol says: line 2",
                "alice says: line 3", "carol says: line 4"]
    got = [bob.read_line() for _ in range(5)]
    # each sender's lines keep their order; and the browser sees what nc sees
    assert [line for line in got if "carol" in line] == [
        line for line in expected if "carol" in line]
    assert [line for line in got if "alice" in line] == [
        line for line in expected if "alice" in line]
    assert [alice.read_line() for _ in range(3)] == [line for line in got if "carol" in line]


def test_browser_student_sees_history(start_server, joined, browser):
    server = start_server(history=5)
    bob = joined("bob", server)
    bob.send("before you came")
    bob.send("/who")  # answered after the message above is in the history
    bob.expect("Online now")
    alice = browser(server)
    alice.send("alice")
    alice.expect("What was said before you came")
    alice.expect("bob says: before you came")


def test_browser_student_uses_commands(bob_and_alice):
    bob, alice = bob_and_alice
    alice.send("/who")
    alice.expect("Online now (2): alice, bob")
    alice.send("/me waves")
    bob.expect_next("* alice waves")
    alice.send("/msg bob psst")
    bob.expect_next("alice whispers: psst")
    alice.send("/nick alicia")
    bob.expect_next("*** alice is now alicia.")


def test_browser_student_is_paced_when_flooding(start_server, joined, browser):
    server = start_server(flood_rate=20, flood_burst=2)
    bob = joined("bob", server)
    alice = browser(server).join("alice")
    bob.expect("alice joined")
    for number in range(5):
        alice.send("flood %d" % number)
    alice.expect("too fast")
    for number in range(5):
        bob.expect_next("alice says: flood %d" % number)


def test_kicked_browser_student_is_told_and_gets_a_close_frame(server, bob_and_alice):
    bob, alice = bob_and_alice
    teacher(server, "/kick alice be nice")
    alice.expect("removed you from the chat: be nice")
    alice.expect_close_code(1000)
    bob.expect_next("*** alice left the chat.")


def test_muted_browser_student_reaches_nobody(server, joined, bob_and_alice):
    bob, alice = bob_and_alice
    teacher(server, "/mute alice")
    alice.expect("muted you")
    alice.send("can anyone hear me")
    bob.expect_nothing_before(joined("carol"), sentinel="*** carol joined")


def test_quiet_mode_holds_browser_students_too(server, joined, bob_and_alice):
    bob, alice = bob_and_alice
    teacher(server, "/quiet on")
    alice.expect("[teacher]")
    alice.send("psst")
    alice.expect("only the teacher can speak")
    bob.expect("[teacher]")
    bob.expect_nothing_before(joined("carol"), sentinel="*** carol joined")


def test_shutdown_notice_reaches_browser_students(server, browser):
    alice = browser().join("alice")
    server.close_room()
    alice.expect("Server is shutting down.")
    alice.expect_close_code(1000)


def test_password_is_asked_of_browser_students(start_server, browser, joined):
    server = start_server(password="secret")
    alice = browser(server)
    alice.expect("Password?")
    alice.send("secret")
    alice.expect("What is your name?")


def test_events_are_encoded_once_per_kind_of_client(server, browser, joined, monkeypatch):
    calls = []
    real = chat_server.encode_websocket_lines

    def counting(lines):
        calls.append(list(lines))
        return real(lines)

    monkeypatch.setattr(chat_server, "encode_websocket_lines", counting)
    sockets = [browser().join(name) for name in ("ann", "ben", "cat")]
    bob = joined("bob")
    for student in sockets:
        student.expect("bob joined")
    del calls[:]
    bob.send("to everyone")
    for student in sockets:
        student.expect_next("bob says: to everyone")
    assert calls == [["bob says: to everyone"]]


# --- Sans-I/O codec and refusal answers: bytes in, bytes out ---


def test_decoder_gives_the_same_events_whatever_the_reads():
    data = (frame(TEXT, b"hel", fin=False) + frame(PING, b"p") + frame(CONTINUATION, b"lo")
            + frame(TEXT, "é".encode() * 200) + frame(CLOSE, struct.pack("!H", 1000)))
    expected = [("ping", b"p"), ("text", b"hello"), ("text", "é".encode() * 200),
                ("close", 1000, "")]
    for size in (1, 2, 3, 7, 64, len(data)):
        decoder = chat_server.WebSocketDecoder(65536)
        events = []
        for start in range(0, len(data), size):
            events += decoder.feed(data[start:start + size])
        assert events == expected, size


def test_empty_continuation_frames_hold_no_memory():
    """A message sent as endless empty pieces costs its text, not a list of pieces."""
    decoder = chat_server.WebSocketDecoder(65536)
    assert decoder.feed(frame(TEXT, b"a", fin=False)) == []
    empty = frame(CONTINUATION, b"", fin=False) * 20000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert decoder.feed(empty) == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10000, grown
    assert decoder.feed(frame(CONTINUATION, b"b")) == [("text", b"ab")]


def test_encode_frame_uses_the_right_length_form():
    assert chat_server.encode_frame(TEXT, b"x" * 125)[:2] == b"\x81\x7d"
    assert chat_server.encode_frame(TEXT, b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert chat_server.encode_frame(TEXT, b"x" * 65536)[:10] == (
        b"\x81\x7f" + (65536).to_bytes(8, "big"))


def test_refusal_answer_for_a_line_client_is_one_line():
    assert chat_server.refusal_answer(b"", "The room is full.") == b"*** The room is full.\r\n"
    assert chat_server.refusal_answer(b"alice\r\n", "Full.") == b"*** Full.\r\n"


def test_refusal_answer_for_a_page_request_is_a_503_with_the_reason():
    answer = chat_server.refusal_answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "The room is full.")
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert answer.endswith(b"The room is full.\r\n")


def test_refusal_answer_for_an_upgrade_is_handshake_message_and_close():
    request = (b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    answer = chat_server.refusal_answer(request, "The room is full.")
    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example
    text = chat_server.encode_frame(TEXT, b"*** The room is full.\r\n")
    assert frames == text + chat_server.close_frame(1000)


def test_a_frame_sent_in_the_same_packet_as_the_upgrade_request_is_read(server, joined):
    """A client may send its first message right behind the request: it is the name."""
    bob = joined("bob")
    host, port = server.server_address[:2]
    request = ("GET /chat HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n" % (host, port)).encode("latin-1")
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(request + frame(TEXT, b"alice"))  # one write, one packet
        bob.expect_next("*** alice joined the chat.")


def test_source_file_downloads_whole_even_past_a_small_sendq(start_server):
    server = start_server(sendq=4096)
    status, _, body = get(server, "/chat_server.py")
    assert status == "HTTP/1.1 200 OK"
    assert len(body) == len(open(chat_server.__file__, "rb").read())


def test_source_file_downloads_whole_to_a_slow_reader(start_server, monkeypatch):
    """A download may take a while (HTTP_SEND_SECONDS): closing after it is sent
    must not give up as soon as after a goodbye line (SHUTDOWN_GRACE_SECONDS)."""
    monkeypatch.setattr(chat_server, "SHUTDOWN_GRACE_SECONDS", 0.05)
    keepalive = chat_server.enable_keepalive

    def small_send_buffer(sock):  # the server's side of a slow link holds little
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        keepalive(sock)

    monkeypatch.setattr(chat_server, "enable_keepalive", small_send_buffer)
    server = start_server()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow link
        sock.settimeout(TIMEOUT)
        sock.connect(server.server_address)
        sock.sendall(b"GET /chat_server.py HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = []
        while True:
            data = sock.recv(4096)
            if not data:
                break
            received.append(data)
            time.sleep(0.002)  # reads slowly: the pace is what this test is about
    body = b"".join(received).split(b"\r\n\r\n", 1)[1]
    assert body == open(chat_server.__file__, "rb").read()


def test_one_computer_downloading_the_file_again_and_again_is_told_to_wait(start_server):
    """Each download is 320 KiB: a loop of them would only load the lab's network."""
    server = start_server(per_address=2)  # DOWNLOADS_PER_MINUTE, times 2
    for _ in range(chat_server.DOWNLOADS_PER_MINUTE * 2):
        assert get(server, "/chat_server.py")[0] == "HTTP/1.1 200 OK"
        # (Else the next might be refused as a third connection from this computer.)
        wait_until(lambda: server.places_taken() == 0, message="the download's connection gone")
    status, _, body = get(server, "/chat_server.py")
    assert status == "HTTP/1.1 429 Too Many Requests"
    assert b"try again in a minute" in body
    assert get(server, "/")[0] == "HTTP/1.1 200 OK"  # the page itself is not limited


def test_in_shared_machine_mode_downloads_are_not_counted(start_server):
    server = start_server(per_address=0)
    for _ in range(chat_server.DOWNLOADS_PER_MINUTE + 1):
        assert get(server, "/chat_server.py")[0] == "HTTP/1.1 200 OK"


class ChunkedReads:
    """Feeds read_request_head(): recv() returns the given chunks, then None (a timeout)."""

    def __init__(self, *chunks):
        self.chunks = list(chunks)

    def recv(self, timeout):
        return self.chunks.pop(0) if self.chunks else None


def test_request_head_split_across_reads_is_read_whole():
    reads = ChunkedReads(b"HTTP/1.1\r\nHost: 127.0.0.1\r", b"\n\r\n")
    request = chat_server.read_request_head(reads.recv, b"GET /chat_server.py ")
    assert (request.method, request.path, request.header("host")) == (
        "GET", "/chat_server.py", "127.0.0.1")


def test_head_of_100_header_lines_whose_blank_line_comes_in_a_later_read_is_read():
    """The limit is checked while the head is still coming too: 100 lines pass there."""
    headers = b"".join(b"X-%d: 1\r\n" % number for number in range(100))
    request = chat_server.read_request_head(ChunkedReads(headers, b"\r\n").recv,
                                            b"GET / HTTP/1.1\r\n")
    assert len(request.headers) == 100


def test_a_header_given_twice_counts_with_both_values():
    """HTTP lets a list header come as several lines: Connection: Upgrade may be the second."""
    request = chat_server.read_request_head(
        ChunkedReads().recv,
        b"GET /chat HTTP/1.1\r\nConnection: keep-alive\r\nConnection: Upgrade\r\n\r\n")
    assert request.has_token("connection", "upgrade")
    assert request.has_token("connection", "keep-alive")


def test_first_line_that_is_not_a_request_ends_the_http_reading():
    """Something that began like a request but is not one is refused at its line end."""
    with pytest.raises(chat_server.BadRequest) as refused:
        chat_server.read_request_head(ChunkedReads(b"there\r\n", b"more\r\n").recv,
                                       b"HELLO ")
    assert refused.value.status == 400


def test_silent_request_head_times_out_with_408():
    with pytest.raises(chat_server.BadRequest) as refused:
        chat_server.read_request_head(ChunkedReads().recv, b"GET / HTTP/1.1\r\n")
    assert refused.value.status == 408


SLOW_LEFT = "*** slow left the chat."


def chat_until_slow_is_dropped(bob, alice, line, batch, most_bytes=20_000_000):
    """bob sends batches of line that alice reads, until alice sees slow dropped.

    Returns (lines said, lines alice received).
    """
    said = received = 0
    while SLOW_LEFT not in alice.seen and said * len(line) < most_bytes:
        bob.send_raw((line + "\r\n").encode() * batch)
        said += batch
        while received < said:
            got = alice.read_line()
            assert got is not None, "alice was disconnected"
            received += got == "bob says: " + line
    return said, received


def test_browser_student_who_stops_reading_is_dropped_as_too_slow(start_server, room, browser):
    server = start_server(flood_rate=0, sendq=64 * 1024)
    alice, bob = room("alice", "bob", target=server)
    browser(server, rcvbuf=4096).join("slow")  # joins, then never reads
    alice.expect("slow joined")
    bob.expect("slow joined")
    said, received = chat_until_slow_is_dropped(bob, alice, "x" * 1000, batch=20)
    assert alice.seen.count(SLOW_LEFT) == 1
    assert received == said
