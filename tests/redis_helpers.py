"""Helpers for the Redis tests: a real redis-server, and a proxy that can fail.

RedisServer runs `redis-server` on a free 127.0.0.1 port with nothing saved
to disk, and is stopped by its PID. LinkProxy sits between a chat server
and Redis and plays the network: it can freeze the link (bytes stop moving,
as with a cable pulled), cut it (every connection closed at once), or
refuse new connections for a while.
"""

import os
import select
import socket
import subprocess
import threading
import time

import chat_server

TIMEOUT = 5.0  # seconds for any one wait
PROXY_POLL_SECONDS = 0.05  # how often a proxy pump checks whether it is frozen


def free_port():
    """A TCP port that was free a moment ago (redis-server cannot take port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1, nothing saved to disk; stop() kills it by PID."""

    def __init__(self, path, password=None):
        self.path = path
        self.password = password
        for _ in range(5):  # the free port may be taken before Redis binds it
            self.port = free_port()
            if self._start():
                return
        raise RuntimeError("redis-server did not start")

    def _start(self):
        command = [self.path, "--save", "", "--appendonly", "no", "--port", str(self.port),
                   "--bind", "127.0.0.1"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        if self._wait_ready():
            return True
        self.stop()
        return False

    def restart(self):
        """Kill Redis and start it again on the same port, empty (nothing was saved)."""
        self.stop()
        if not self._start():
            raise RuntimeError("redis-server did not start again on port %d" % self.port)

    def _wait_ready(self):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.connect().close()
                return True
            except (OSError, chat_server.RedisError):
                time.sleep(0.02)  # polling for start-up, not a wait for an event
        return False

    def url(self, room="class", port=None, password=None):
        """The --redis URL for this server (or for a proxy's port)."""
        password = self.password if password is None else password
        auth = ":%s@" % password if password else ""
        return "redis://%s127.0.0.1:%d/%s" % (auth, port or self.port, room)

    def settings_url(self, room="class", port=None):
        """The same, parsed as --redis parses it, for Settings(redis=...)."""
        return chat_server.redis_url_flag(self.url(room, port))

    def connect(self):
        """A RESP connection for the test itself (to look at keys, or write bad events)."""
        return chat_server.RedisConnection(chat_server.redis_url_flag(self.url()), TIMEOUT)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


class LinkProxy:
    """A TCP proxy to Redis that a test can freeze, cut, or make refuse connections."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(PROXY_POLL_SECONDS)
        self.port = self.listener.getsockname()[1]
        self.moving = threading.Event()  # cleared: frozen, no byte moves
        self.moving.set()
        self.refusing = False
        self.closed = False
        self.pairs = []  # [client side, Redis side] of each open connection
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                inside, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.refusing:
                inside.close()
                continue
            try:
                outside = socket.create_connection(("127.0.0.1", self.target_port), TIMEOUT)
            except OSError:
                inside.close()
                continue
            pair = [inside, outside]
            with self.lock:
                self.pairs.append(pair)
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(pair, source, sink),
                                 daemon=True).start()

    def _pump(self, pair, source, sink):
        try:
            while True:
                if not self.moving.is_set():
                    self.moving.wait(PROXY_POLL_SECONDS)
                    continue
                readable, _, _ = select.select([source], [], [], PROXY_POLL_SECONDS)
                if not readable or not self.moving.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except (OSError, ValueError):
            pass
        self._close_pair(pair)

    def _close_pair(self, pair):
        with self.lock:
            if pair in self.pairs:
                self.pairs.remove(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def freeze(self):
        """Stop moving bytes: to both ends the link is silent."""
        self.moving.clear()

    def thaw(self):
        """Drop the frozen connections (their bytes are stale), then move bytes again."""
        self.cut()
        self.moving.set()

    def resume(self):
        """Move bytes again through the same connections: a network that was slow."""
        self.moving.set()

    def cut(self):
        """Close every open connection at once, as a crashed router would."""
        with self.lock:
            pairs = list(self.pairs)
        for pair in pairs:
            self._close_pair(pair)

    def close(self):
        self.closed = True
        self.moving.set()
        self.cut()
        self.listener.close()


def redis_env(url):
    """The environment for a chat_server.py process with --redis taken from CHAT_REDIS."""
    env = dict(os.environ)
    env["CHAT_REDIS"] = url
    return env
