"""A small WebSocket client (RFC 6455) for the tests: standard library only.

It speaks to chat_server.py's page socket and to Chromium's DevTools, so
it does what a browser does (masked frames) and lets a test do what a
browser never would (unmasked frames, binary, bad UTF-8, huge headers).
Every read has a deadline.
"""

import base64
import hashlib
import os
import socket
import struct
import time

from conftest import LineExpectations

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
TIMEOUT = 5.0


class HandshakeFailed(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status_line, head):
        super().__init__(status_line)
        self.status_line = status_line
        self.head = head


def frame(opcode, payload, fin=True, mask=True, rsv=0, key=None):
    """One frame's bytes, as a client sends it (masked unless mask=False)."""
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload)
    mask_bit = 0x80 if mask else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not mask:
        return header + payload
    key = key or os.urandom(4)
    masked = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload)) if size < 4096 else (
        (int.from_bytes(payload, "big") ^ int.from_bytes((key * (size // 4 + 1))[:size], "big"))
        .to_bytes(size, "big"))
    return header + key + masked


class WebSocketClient:
    """One WebSocket connection; recv_*() methods wait at most `timeout` seconds."""

    def __init__(self, host, port, path="/chat", headers=None, timeout=TIMEOUT,
                 origin=True, rcvbuf=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as browsers do
        if rcvbuf:  # before connecting, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buffer = b""
        self.closed_with = None  # (code, reason) of the server's close frame
        self.handshake(host, port, path, headers or {}, origin)

    def handshake(self, host, port, path, headers, origin):
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        host_header = "%s:%d" % (host, port)
        fields = {"Host": host_header, "Upgrade": "websocket", "Connection": "Upgrade",
                  "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
        if origin:
            fields["Origin"] = "http://" + host_header
        fields.update(headers)
        request = "GET %s HTTP/1.1\r\n" % path + "".join(
            "%s: %s\r\n" % pair for pair in fields.items() if pair[1] is not None) + "\r\n"
        self.sock.sendall(request.encode("latin-1"))
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line = head.split("\r\n", 1)[0]
        if " 101 " not in status_line:
            raise HandshakeFailed(status_line, head)
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert "Sec-WebSocket-Accept: %s" % expected in head, head

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the server")
        self.buffer += data

    def _read_until(self, marker):
        deadline = time.monotonic() + self.timeout
        while marker not in self.buffer:
            self._fill(deadline)
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def _read_exactly(self, size, deadline):
        while len(self.buffer) < size:
            self._fill(deadline)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    # -- Sending --

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload, **options):
        self.send_raw(frame(opcode, payload, **options))

    def send_text(self, text):
        self.send_frame(TEXT, text.encode("utf-8"))

    def ping(self, payload=b""):
        self.send_frame(PING, payload)

    def close(self, code=1000, reason=""):
        """Send a close frame (the server answers with its own)."""
        self.send_frame(CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))

    def shutdown(self):
        self.sock.close()

    # -- Receiving --

    def recv_frame(self, timeout=None):
        """(fin, opcode, payload) of the next frame; ConnectionError at the end."""
        deadline = time.monotonic() + (timeout or self.timeout)
        first, second = self._read_exactly(2, deadline)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read_exactly(2, deadline))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read_exactly(8, deadline))[0]
        key = self._read_exactly(4, deadline) if second & 0x80 else None
        payload = self._read_exactly(size, deadline)
        if key:
            payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def recv_message(self, timeout=None):
        """The next text message (str); answers pings; None after a close frame."""
        deadline = time.monotonic() + (timeout or self.timeout)
        parts = []
        while True:
            fin, opcode, payload = self.recv_frame(max(0.001, deadline - time.monotonic()))
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.closed_with = (code, payload[2:].decode("utf-8", "replace"))
                return None
            if opcode == PING:
                self.send_frame(PONG, payload)
                continue
            if opcode == PONG:
                continue
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8")


class ChatSocket(LineExpectations, WebSocketClient):
    """A browser student: WebSocketClient plus the line helpers of ChatClient."""

    def __init__(self, *args, **kwargs):
        self.pending = []  # lines received, not yet read
        self.seen = []
        super().__init__(*args, **kwargs)

    def send(self, line):
        self.send_text(line)

    def read_line(self, timeout=None):
        """The next line the server sent; None after its close frame."""
        if not self.pending:
            message = self.recv_message(timeout)
            if message is None:
                return None
            assert message.endswith("\r\n"), "not whole lines: %r" % message
            self.pending.extend(message[:-2].split("\r\n"))
        line = self.pending.pop(0)
        self.seen.append(line)
        return line

    def expect_close_code(self, code, timeout=None):
        """Read until the server's close frame; it must carry code."""
        self.expect_closed(timeout)
        assert self.closed_with is not None, "no close frame; got %r" % self.seen
        assert self.closed_with[0] == code, "closed with %r, not %d" % (self.closed_with, code)
