"""A classroom chat server: every line a student types goes to everyone else.

Single file, standard library only, Python 3.9 or newer, on Linux, macOS and
Windows.

Run it:
    python chat_server.py                  # listens on 127.0.0.1:1337
    python chat_server.py --host 0.0.0.0   # opens the room to the lab network
    python chat_server.py --help           # every flag, with its default

Join it, from another terminal or another computer:
    http://127.0.0.1:1337/                 # in a browser: the chat page
    nc 127.0.0.1 1337                      # or: telnet 127.0.0.1 1337
    python chat_server.py --connect 127.0.0.1

How it works: three moving parts, at the top of the file in this order
(two threads of the room's help them: the notices thread gives out join,
leave and rename lines, and the recorder shows the chat on the console).
  * One reader thread per client (ChatHandler, a StreamRequestHandler) reads
    what that client types, line by line, and asks the room to act on it.
  * The room (ChatRoom, a socketserver.ThreadingTCPServer) owns the dict of
    joined clients and the lock that protects it. It hands each room event
    (a line, or a few said at once) to every client, in the same order. (ChatServer, later in
    the file, is the room with everything around it: admitting connections,
    the room operations the teacher's console calls, shutting down. main()
    runs a ChatServer.)
  * Each client (Client) has an outbox. Under the room's lock a line is only
    queued in every outbox (that fixes the order); after the lock, it is sent
    to each socket without waiting. (Join, leave and rename lines are given
    out by the notices thread a moment later, in bulk: see Notices, right
    after the core.) What a
    full socket cannot take stays queued, and that client's writer thread
    sends it when there is room. So one student who stops reading cannot
    slow anybody else down: only their own outbox fills up, and past
    --sendq they are disconnected.

The terminal running the server is the teacher's console: it shows the chat,
and lines typed there are announcements or commands (type /help there).
Ctrl+C (or /shutdown) runs ChatServer.stop_serving(): everyone is told
goodbye and the room closes, then serve_forever() returns and main() ends
(see stop_on_signal(), near the end).

After the core come the parts that each add one thing: join, leave and
rename lines in bulk (Notices, which gives them out; built for speed, as
sending each at once would be as correct), what protects the room (text
cleaning, names nobody can fake, limits per connection, per computer and for
the whole room, the greeting and the password), ChatServer, the students'
commands, the teacher's console and transcript, the browser page (HTTP and a
WebSocket on the same port), the Redis link (several servers, one room), the
--connect line client, and main(). Each section starts by saying what it
adds and where the core calls it.

The life of one line, "hi" typed by alice, step by step; the three parts of
the core come below in the same order (ChatHandler, ChatRoom, Client):
  1. ChatHandler.handle() is alice's reader thread (socketserver starts one
     for each connection that ChatServer.process_request() admits): once
     ask_name() has joined her to the room (see "Before joining"), chat()
     reads her lines until she leaves.
  2. read_line() waits for bytes (wait_for_bytes(), a recv() on her socket)
     and take_bytes() cuts them into clean lines: b"hi\r\n" becomes "hi"
     (TelnetLines does the cutting and cleaning: see "Text helpers").
  3. chat() paces her (pace_flood(): see "Limits"), and handle_line()
     sees a message, not a /command, and calls the room's ChatRoom.say().
  4. say() calls _speak(), which words it (event_lines()) and takes the
     room's lock; _broadcast() adds "alice says: hi" to the history, hands it
     to the recorder (the teacher's console and the transcript: see
     Recorder), and queues it in every other client's outbox
     (Client.queue_bytes()). Under the lock, so everyone gets the same order.
     (Join, leave and rename lines still waiting to go out in bulk are queued
     ahead of it, to alice too: see Notices. With --redis, nothing is queued
     yet: the line goes through Redis first, and is queued when it comes
     back.)
  5. After the lock, _send_queued() calls each client's Client.flush(),
     which sends what its socket takes at once (_send_what_fits()). (With
     --redis, it first sends the line to Redis the same way:
     RedisLink.send_outbox().)
  6. If bob's socket is full, the rest waits in his outbox; his writer thread
     (Client._run_writer(), started the first time his socket is full, or
     when he leaves with bytes still queued) sends it when there is room.
     If his outbox passes --sendq, queue_bytes() marks him too slow, and
     _send_queued() has the room's drop_too_slow() disconnect him.
  7. When alice leaves, the room's leave() takes her out of the dict and
     hands "*** alice left the chat." to the notices thread, once: called by
     ChatHandler.finish() (end of input, a browser tab closed, a reset, a
     link that TCP keepalive found dead), or earlier by /quit and telnet's
     Ctrl+C (do_quit()), drop_too_slow() or the teacher's
     remove_by_teacher(); at shutdown, no leave lines are sent (with --redis,
     the other servers are told: see RedisLink.close()). With --redis, a
     leave on another server comes as an event from Redis
     (RedisLink.apply()), worded by the same event_lines(); if that server
     died, one of the others tells it (RedisLink._reap()).

Licence: MIT (see LICENSE).
"""

# Glossary, the words used everywhere below:
#   client      one connection, from nc, telnet, PuTTY, --connect or a browser.
#   address     the computer a client connects from (its IP address, one
#               spelling: see normal_host; a Client's host); limits, bans
#               and mutes use it. (A Client's address field adds the port.)
#   name        what a client is called once it has joined; unique, compared
#               after NFKC normalisation and case folding (its "key").
#   line        one line of text, as typed; the server ends each it sends
#               with CR LF.
#   room event  a join, message, action, rename, announcement, quiet on or
#               off, or leave: a line (or a few) that every joined client
#               sees, in the same order; as data, {"k": kind, ...}, worded
#               by event_lines() (and sent so between linked servers).
#   outbox      a client's queue of bytes not yet sent, bounded by --sendq (and
#               one longer piece, such as a newcomer's history: see
#               Client._queue()); what a full socket cannot take, its writer
#               thread sends later.
#   notice      a join, leave or rename line: a room event that may go out a
#               little late (NOTICES_LATE_SECONDS), in bulk: see Notices.

import sys

if sys.version_info < (3, 9):  # checked first: older ones fail at the imports
    sys.exit("chat_server.py needs Python 3.9 or newer; this is Python %d.%d."
             % tuple(sys.version_info[:2]))

import signal  # noqa: E402  (after the version check)

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # A Ctrl+C while the server starts (before serve() sets its handlers:
    # stop_on_signal()) ends it as the OS would, with no traceback. (The
    # line client catches KeyboardInterrupt itself: main() puts it back.)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse  # noqa: E402
import base64
import binascii
import bisect
import collections
import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import logging.handlers
import os
import queue
import re
import selectors
import shlex
import shutil  # only get_terminal_size(), for the console's width (a fallback)
import socket
import socketserver
import struct
import subprocess  # only list2cmdline, to show a command line on Windows
import threading
import time
import unicodedata
import urllib.parse

try:
    import resource  # POSIX only: lets a big class past the open-file limit
except ImportError:  # Windows has no such limit on sockets
    resource = None

# --- Constants: each is the default of one command-line flag ------------------

HOST = "127.0.0.1"  # only this computer can join; --host 0.0.0.0 opens the lab
PORT = 1337  # the tutorial's port
MAX_CLIENTS = 256  # a big lecture hall, with room to spare for reconnects
MAX_LINE_BYTES = 1024  # a long paragraph; stops one paste filling screens
FLOOD_RATE_LINES_PER_SECOND = 5.0  # faster than anyone types by hand
FLOOD_BURST_LINES = 10  # a short pasted snippet goes through at once
NICK_RATE_PER_MINUTE = 3  # enough to fix a typo; too few to confuse the class
NAME_TIMEOUT_SECONDS = 60.0  # time to type the password and a name
SENDQ_BYTES = 256 * 1024  # minutes of busy chat for a client that lags
HISTORY_EVENTS = 20  # lines: about one screen of context for a late joiner
BAN_MINUTES = 5.0  # long enough to calm down, short enough to forgive
PER_ADDRESS = 8  # connections from one computer: a terminal, a browser and
#                  a few reconnects, but not a script holding the room
ROOM_BYTES_PER_SECOND = 32 * 1024  # all students' text together: half of what
#                                    a slow school laptop reads (64 KiB/s)
COMPUTER_LINES_PER_CONNECTION = 0.25  # one computer's lines, all its connections
#   together: --flood-rate times a quarter of --per-address, and at least twice
#   it (as by default): two students at one computer type freely, and one
#   connection alone meets its own limit first; but eight connections of one
#   student no longer say forty lines a second
COMPUTER_SHARE_OF_ROOM = 4  # one computer's text may take at most a quarter of
#   --room-rate (8 KiB/s: pages of chat), so one student with all their connections
#   cannot use up the room's budget and hold everyone else's lines back

# The largest values those flags take: anything bigger is a typo, and waits
# much longer than a day overflow the timers of some systems (about 24 days).
MAX_FLOOD_RATE = 1000.0  # lines a second; 0 turns pacing off
MAX_NAME_TIMEOUT_SECONDS = 24 * 60 * 60.0  # a day
MAX_BAN_MINUTES = 24 * 60.0  # a day; /unban lifts a ban sooner

# Fixed numbers that are not flags.
MAX_NAME_CHARS = 20  # fits in a line prefix and a /who list
RECV_BYTES = 4096  # one read; lines are framed by us, not by recv()
LISTEN_BACKLOG = 128  # a whole class connecting in the same second (the
#                       default of 5 drops SYNs: a 1-3 s retry per student)
BROWSER_WAIT_SECONDS = 0.25  # a browser sends its request at once, a person
#                              needs longer: see greet()
SPARE_CONNECTION_SECONDS = 5.0  # a connection this soon after its computer got
#                                 the page may be the browser's spare one
SHARED_SPARE_SECONDS = 1.0  # ...and with --per-address 0, where the whole class
#   may be one address: a browser opens its spares as the page loads, and an
#   nc student who connects within this second sees the welcome only at Enter
PASSWORD_ANSWER_SECONDS = 1.0  # every password answer, right or wrong, comes
#                                 after this long: a guesser learns nothing sooner
PASSWORD_FAILURES_FREE = 3  # wrong passwords an address may give (times
#                             --per-address) before it must wait...
PASSWORD_WAIT_SECONDS = 10.0  # ...this long, doubling with each failure after...
PASSWORD_WAIT_MAX_SECONDS = 300.0  # ...up to this; never a lock-out for good
PASSWORD_FAILURES_KEPT_SECONDS = 24 * 60 * 60.0  # wrong passwords are forgotten a
#   day after the last: sooner, a guesser who pauses would get free tries again
JOINS_PER_MINUTE = 3  # joins from one address (times --per-address) in a
#                        minute; the first ones are instant, so a student whose
#                        Wi-Fi dropped is back at once
DOWNLOADS_PER_MINUTE = 2  # of chat_server.py from one address (times --per-address):
#                           more would only load the lab's network (it is 320 KiB)
INPUT_BYTES_PER_SECOND = 16 * 1024  # what one connection may send: ten times a
INPUT_BURST_BYTES = 64 * 1024  # fast typist, and a pasted page at once
MAX_QUIT_REASON_CHARS = 60  # a reason, not a speech
MAX_MARKS_PER_LETTER = 3  # combining marks on one letter (Vietnamese needs 2)
REFUSALS_AT_ONCE = 256  # refused connections being told why at once, at most
REFUSAL_DRAIN_READS = 4  # what a refused client sent with its first packets
REFUSAL_DRAIN_SECONDS = 2.0  # read what a refused client sent, so that closing
#                              does not reset the connection and eat our line
DROPPED_REMEMBERED = 1000  # addresses told, when they return, why they were dropped
ADDRESSES_SWEEP_SECONDS = 60.0  # how often what the room knows of past addresses
#                                 is looked over, and what no longer matters forgotten
RECORD_QUEUE_EVENTS = 10000  # room events waiting for the console and transcript
RECORDER_PAUSE_SECONDS = 0.005  # woken by a room event, the recorder first waits
#   this long: the thread that spoke sends to everyone meanwhile, without the
#   recorder taking turns with it at the interpreter (Python threads take turns:
#   see "Why not let a writer thread..." in the README). Measured: a fifth off
#   the time a line takes to reach 30 students; a console line is 5 ms late
#   (about 16 ms on Windows before Python 3.11, whose sleeps are coarser).
CONSOLE_ENDS_PER_SECOND = 3  # more Ctrl+Ds than this: the terminal is gone
CONSOLE_FOREGROUND_CHECK_SECONDS = 0.5  # how often a backgrounded console looks
HELD_BACK_REPORT_SECONDS = 10.0  # the console counts a muted student's lines
#                                  and shows the count this often
RECORDER_CHECK_SECONDS = 1.0  # how late such a count may come, at most
CONNECTION_LINES_SHOWN = 30  # console lines about one computer's connections
#                              (a browser's visit takes about 5)...
CONNECTION_LINES_SECONDS = 10.0  # ...shown in this long; past them, only a count
TRANSCRIPT_QUEUE_LINES = 10000  # lines waiting for a slow transcript disk
SHUTDOWN_GRACE_SECONDS = 1.0  # for the goodbye line to reach each client
SHUTDOWN_POLL_SECONDS = 0.05  # how soon serve_forever() sees a shutdown begin
SIGNAL_CHECK_SECONDS = 0.05  # the main thread waits in slices this long, so a
#                              second Ctrl+C during the shutdown acts at once
KEEPALIVE_IDLE_SECONDS = 60  # a silent peer is probed after this long...
KEEPALIVE_INTERVAL_SECONDS = 10  # ...then every this many seconds...
KEEPALIVE_PROBES = 6  # ...and given up after this many unanswered probes
UNACKED_SECONDS = 120  # a peer that acknowledges nothing we send for this
#                        long is gone (twice the probes' minute; Linux only)
ACCEPT_BACKOFF_SECONDS = 0.1  # rest after "too many open files" at accept
WRITER_CHECK_SECONDS = 0.5  # a waiting writer checks this often if it was closed
NOTICES_LATE_SECONDS = 0.1  # how long a join or leave line may wait for the
#                             clients a round reaches last (see Notices)
NOTICES_RETRY_SECONDS = 0.5  # after a failed round of join lines (no thread could
#                              start): soon, but a lasting fault logs twice a second
ROUTE_PROBE_ADDRESS = ("198.51.100.1", 9)  # a documentation address (RFC 5737):
#                                           only asked how it would be routed
FILES_BESIDES_CLIENTS = 64  # the listening socket, the console, the transcript...

RESERVED_NAMES = frozenset(
    ["admin", "administrator", "moderator", "root", "server", "system", "teacher"]
)
RESERVED_WORDS = RESERVED_NAMES - {"root"}  # ...also as a word of a name, but
#   root, a surname too (Joe.Root), only alone

EXIT_OK = 0
EXIT_STARTUP_ERROR = 2  # also argparse's status for a bad flag
EXIT_CONNECT_FAILED = 1
EXIT_INTERRUPTED = 130  # a second Ctrl+C during the shutdown: 128 + SIGINT
# Ctrl+C, a service manager's stop, and (not on Windows) the terminal closing:
# each says goodbye to everyone. Under nohup the last is ignored, and stays so.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())

log = logging.getLogger("chat_server")

# Waits on one socket without opening a file of its own: poll() where it
# exists, else select() (Windows). select() elsewhere fails for sockets
# numbered 1024 and up, which a big class reaches.
OneSocketSelector = getattr(selectors, "PollSelector", selectors.SelectSelector)


@dataclasses.dataclass
class Settings:
    """The room's rules: one field per flag that sets one (not --host, --port,
    --transcript or --connect)."""

    password: str = ""
    max_clients: int = MAX_CLIENTS
    max_line: int = MAX_LINE_BYTES
    flood_rate: float = FLOOD_RATE_LINES_PER_SECOND
    flood_burst: int = FLOOD_BURST_LINES
    nick_rate: int = NICK_RATE_PER_MINUTE
    name_timeout: float = NAME_TIMEOUT_SECONDS
    sendq: int = SENDQ_BYTES
    history: int = HISTORY_EVENTS
    ban_minutes: float = BAN_MINUTES
    per_address: int = PER_ADDRESS  # 0: a shared machine, no per-address rules
    room_rate: int = ROOM_BYTES_PER_SECOND  # 0: no room-wide budget
    transcript_private: bool = False  # private messages on the console and transcript
    redis: object = None  # a RedisURL: link this room to others through Redis (--redis)


# =============================================================================
# The core, in the order a line travels: the reader thread that reads it,
# the room that queues it for everyone, each client's outbox that sends it.
# Read these three parts first; everything after them adds to them.
# =============================================================================

# --- One reader thread per client: ChatHandler --------------------------------
# socketserver starts one for each connection the room admits. It reads
# bytes, cuts them into lines, and calls the room: say(), join(), leave().

TOO_LONG = object()  # the framer's stand-in for a line longer than --max-line
TELNET_CTRL_C = object()  # ...and for telnet's Ctrl+C (IAC IP): leave, as /quit does


class NoAnswerInTime(Exception):
    """The client did not answer a prompt (password, name) before its deadline."""


class ChatHandler(socketserver.StreamRequestHandler):
    """One client's reader thread: its life from greeting to leaving.

    NOTE: we read with recv() and frame lines ourselves instead of using
    self.rfile.readline(): students' clients end lines with a bare CR or
    CR NUL too, telnet mixes commands into the text, and the socket is
    non-blocking (so that sending to it never waits), which a file reader
    does not handle.
    """

    disable_nagle_algorithm = True  # TCP_NODELAY: a line leaves at once
    rbufsize = 0  # self.rfile is never read (see above): no 8 KiB buffer per client

    def setup(self):
        super().setup()
        self.room = self.server  # socketserver's name for it; here, it is the room
        settings = self.room.settings
        self.client = Client(self.request, self.client_address, settings.sendq)
        self.client.renames = RateWindow(settings.nick_rate, 60)
        # How its bytes become lines: a browser's upgrade swaps in WebSocketLines.
        self.framing = TelnetLines(self.client, settings.max_line)
        self.received = collections.deque()  # lines received, not yet handled
        self.flood = FloodLimiter(settings.flood_rate, settings.flood_burst)
        # Every byte is paced too (telnet NOPs, blank lines, over-long
        # lines): reading simply waits, and TCP makes the sender wait too.
        self.input_pace = FloodLimiter(
            INPUT_BYTES_PER_SECOND if settings.flood_rate > 0 else 0, INPUT_BURST_BYTES)
        self.told_flood = False
        self.told_whispers = False  # see do_msg()
        self.quitting = False  # set by /quit (and telnet's Ctrl+C): chat() reads no more
        self.waiting_for = "a name"  # what a timeout before joining was waiting for
        self.lines_read = 0  # a late browser request can only be the first
        enable_keepalive(self.request)
        # Non-blocking, so that whichever thread flushes this client's outbox
        # (often another student's reader: see ChatRoom._send_queued()) sends
        # what fits and never waits. This thread waits for input with its own
        # one-socket selector instead.
        self.request.setblocking(False)
        self.readable = OneSocketSelector()
        self.readable.register(self.request, selectors.EVENT_READ)
        self.room.register(self.client)

    def handle(self):
        """A client's life: greet, check the password, ask a name, join, chat."""
        self.room.tell_console("Accepted new client: %s" % self.client, host=self.client.host)
        timeout = self.room.settings.name_timeout
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            if greet(self) and check_password(self, deadline) and ask_name(self, deadline):
                self.chat()
        except NoAnswerInTime:
            self.reply("*** You did not give %s in time. Goodbye." % self.waiting_for)
            self.room.tell_console("Closed %s: no %s in time" % (
                self.client, self.waiting_for.split()[-1]), host=self.client.host)
        except OSError:
            pass  # a reset, or a dead link: either way, the client leaves (finish())

    # -- A line's way in: read, cut into lines, hand to the room --

    def chat(self):
        """Handle each line the client sends, until it leaves."""
        while not self.quitting:
            line = self.read_line()
            if line is None or self.client.closed.is_set():
                return
            blank = line is not TOO_LONG and says_nothing(line)
            pace_flood(self, blank)  # every line, even blank or too long, is paced
            if line is TOO_LONG:
                self.reply("*** That line was longer than %d bytes and was not sent."
                           % self.room.settings.max_line)
            elif not blank:
                self.handle_line(defuse_server_marker(line.rstrip()))

    def read_line(self, deadline=None):
        """Return the client's next line (str or TOO_LONG), or None when it is gone
        or leaving (telnet's Ctrl+C), or its line was a browser's late request.

        Raises NoAnswerInTime if deadline (a time.monotonic() value) passes,
        even while lines received earlier wait (paced: see pace_flood()).
        """
        if self.received and deadline is not None and time.monotonic() >= deadline:
            raise NoAnswerInTime
        while not self.received:
            data = self.wait_for_bytes(None if deadline is None else deadline - time.monotonic())
            if data is None:
                raise NoAnswerInTime
            if not data:
                return None
            self.take_bytes(data)
        self.lines_read += 1
        line = self.received.popleft()
        if line is TELNET_CTRL_C:
            do_quit(self, "")  # see "The students' commands"
            self.received.clear()
            return None
        # A browser's request that came after the greeting (see "The browser page").
        return None if identify_late_request(self, line) else line

    def wait_for_bytes(self, timeout=None):
        """Wait about timeout seconds for bytes: b'' at the end, None if none came.

        The input pace may then wait a little longer, before returning them.
        """
        while True:
            if timeout is not None and timeout <= 0:
                return None
            if not self.readable.select(timeout) and timeout is not None:
                return None
            try:
                data = self.request.recv(RECV_BYTES)
            except BlockingIOError:
                continue  # woken without data after all: wait again
            delay = self.input_pace.delay_for(len(data))
            if delay > 0:
                self.client.sleep(delay)  # ends early if the client is dropped
            return data

    def take_bytes(self, data):
        """Take raw bytes from the client, and queue the complete lines in them."""
        self.received.extend(self.framing.take_bytes(data))  # TelnetLines: see below

    def handle_line(self, line):
        """A message, or a command if the line starts with /."""
        if is_plain_message(line):
            self.room.say(self.client, student_text(line), *more_messages(self))
        elif line.lstrip().startswith("//"):
            self.room.say(self.client, student_text(line.lstrip()[1:]))  # "//text": "/text"
        else:
            self.run_command(line)

    def reply(self, *lines):
        """Send lines to this client only (after the room's notices before them)."""
        self.room.before_reply(self.client)
        for line in lines:
            self.client.send_line(line)
        if self.client.too_slow:  # its outbox overflowed: the catch-up, or these
            self.room.drop_too_slow(self.client)

    def run_command(self, line):
        """Run a /command (see "The students' commands"); its name is not case-sensitive."""
        word, command, argument = parse_command(line, STUDENT_COMMANDS)
        if command is None:
            self.reply("*** Unknown command: /%s. Type /help to see the commands." % word)
        elif command is do_nick:
            command(self, argument)  # a name: not student_text(), which is for messages
        else:
            command(self, student_text(argument))  # others see it: as a message

    # -- Leaving --

    def finish(self):
        # Every way out ends here: end of input, a reset, /quit, too slow,
        # kicked, shutdown. /quit, telnet's Ctrl+C, too slow and kicked have
        # left the room already (step 7 of the map at the top), and this
        # leave() does nothing; at shutdown it takes the client out silently
        # (the room has said goodbye); at end of input or a reset, it is
        # this leave() that says "left the chat.", once.
        self.room.leave(self.client)
        self.client.close_when_sent()  # e.g. "Bye." is still on its way
        if not self.client.wait_closed(SHUTDOWN_GRACE_SECONDS):
            self.client.close_now()  # it stopped reading: stop waiting for it
        self.room.unregister(self.client)
        self.readable.close()
        self.room.tell_console("Closed connection: %s" % self.client, host=self.client.host)
        super().finish()


# --- The room: ChatRoom -------------------------------------------------------
# The room's dict of joined clients and its lock. A room event is queued for
# every client while the lock is held (_broadcast), then sent after it
# (_send_queued): that gives everyone the same order, and nobody waits.
# (Join, leave and rename lines are handed to Notices instead, under the
# same lock, and go out a moment later, in bulk: see just after the core.)

TOO_SLOW = "too slow to keep up"
NAME_TAKEN = "The name %s is taken."
LOOKS_TAKEN = "That name looks too much like %s, who is online."
REMOVED = "You were removed by the teacher."
MUTED_LINE = "*** The teacher has muted you: your messages reach nobody for now."
SHUTTING_DOWN = "Server is shutting down."  # the goodbye; once it is said, join()
#                                            returns it, and each refusal says it
QUIET_ON_LINE = "*** [teacher] Quiet, please: only the teacher speaks for now."
QUIET_OFF_LINE = "*** [teacher] The chat is open again."


# A room event as data, {"k": kind, ...fields}: how the room passes one to
# the Redis link (see ROOM_EVENTS), and how each is worded, here only.
def event_lines(event):
    """The lines a room event shows: the one place that words them.

    The room words its own events with it, and the Redis link those that
    come from other servers (checked first: see check_event()).
    """
    kind = event["k"]
    if kind == "join":
        return ["*** %s joined the chat." % event["name"]]
    if kind == "leave":
        reason = event.get("reason")
        return ["*** %s left the chat.%s" % (event["name"], " (%s)" % reason if reason else "")]
    if kind == "rename":
        return ["*** %s is now %s." % (event["old"], event["new"])]
    if kind == "say":
        return ["%s says: %s" % (event["name"], text) for text in event["texts"]]
    if kind == "act":
        return ["* %s %s" % (event["name"], event["text"])]
    if kind == "announce":
        return ["*** [teacher] %s" % event["text"]]
    if kind == "mark":
        return []  # Redis link: where a whisper stands among its sender's lines
    return [QUIET_ON_LINE if event["on"] else QUIET_OFF_LINE]  # "quiet"


class ChatRoom(socketserver.ThreadingTCPServer):
    """The core of the room: the dict of joined clients, its lock, the broadcast.

    ChatServer, further down (after what protects the room), is the room the
    program runs: it adds to this core the admission of connections,
    whispers and renames, the console's record, the room
    operations the teacher's console calls, and the shutdown. The core
    uses eight of its parts, each a line or two where the core calls it:
    register() and unregister() (every connection, joined or not),
    _wait_for_room_budget() and _why_silenced() (may this client speak
    now?), recorder.note() and tell_console() (for the console and the
    transcript), addresses (what the room knows about each computer) and
    _keys_from() (the names joined from one computer, for mutes).
    """

    # Class attributes that socketserver reads.
    daemon_threads = True  # a stuck client thread never keeps the process alive
    request_queue_size = LISTEN_BACKLOG
    # On Windows, SO_REUSEADDR would let a second server take our port.
    allow_reuse_address = sys.platform != "win32"

    def __init__(self, address, settings):
        # (ChatServer.__init__() sets self.addresses and self.recorder before
        # it calls this: see the parts of it the core uses, above.)
        self.settings = settings
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._joined = {}  # key (folded name) -> Client, for joined clients
        # The room's lock. It guards _joined and every field from here down
        # to notices (and the notices' fields: see Notices); ChatServer's
        # _connected, _places_taken and _closing_began; the Redis link's
        # fields (see RedisLink); and the room's fields of each Client
        # (name, key, looks, joined_at, muted: changed only under it; not
        # notices_seen: see queue_notices()). Room events go to the recorder
        # (console and transcript) under it, so it sees them in the room's
        # order. Anything else has a lock of its own, is set once, or is
        # a client's own, set by its reader thread (leave_reason, and a
        # browser's encode_lines); muted, _quiet and _closing_began are also
        # read without it where a stale answer does no harm (each says so).
        self._lock = threading.Lock()
        self._keys_in_order = []  # the keys of _joined, sorted, for /who
        self._names_in_order = []  # their names, in the same order: "Online now"
        self._looks = {}  # each of looks_of(name) -> its key, so no one passes for another
        self._history = collections.deque(maxlen=self.settings.history)
        self._quiet = False  # only the teacher's announcements go out
        self._remote = {}  # Redis link: key -> RemoteStudent, students on other servers
        self._remote_looks = {}  # Redis link: their looks_of() -> their keys
        self._link = None  # Redis link: a RedisLink with --redis (see its section)
        # Set by close_room() as it queues "Server is shutting down." for
        # everyone: nothing more is said in the room (no leave lines either),
        # and join() and each refusal say goodbye instead.
        self._said_goodbye = False
        # Join, leave and rename lines wait here, and go out in bulk: see
        # the section "Join and leave lines in bulk", just after the core.
        self.notices = Notices(self)
        super().__init__(address, ChatHandler)  # binds and listens; serve_forever() accepts

    # -- A line's way: queued for all under the lock, sent after it --

    def say(self, client, *texts):
        """Send one or more messages from client to everyone else."""
        self._speak(client, {"k": "say", "texts": list(texts)})

    def act(self, client, action):
        """Send an action (/me) from client to everyone else."""
        self._speak(client, {"k": "act", "text": action})

    def _speak(self, client, event):
        """Send client's say or act event to everyone else (see event_lines())."""
        event["name"] = client.name
        lines = event_lines(event)
        self._wait_for_room_budget(client, lines)
        with self._lock:
            if self._joined.get(client.key) is not client:
                return  # kicked, or dropped, while these lines were on their way
            if event["name"] != client.name:  # renamed meanwhile: only a relink
                event["name"] = client.name  # does that (see RedisLink._rename_taken())
                lines = event_lines(event)
            silenced = self._why_silenced(client)
            if silenced is None:
                recipients = self._broadcast(lines, exclude=client, event=event)
            else:
                for line in lines:
                    self.recorder.note("silenced", (client.name, line))
                self._queue_for(client, silenced)
                recipients = [client]
        self._send_queued(recipients)

    def _broadcast(self, lines, exclude=None, event=None, notice=False):
        """Queue room events for every joined client but exclude (lock held).

        lines is one line, or a list of lines from one sender, which are
        queued together: one queue_bytes() per client, whatever their number.
        Return the clients they were queued for (every joined client, if
        waiting notices were queued first): the caller passes them to
        _send_queued() once it has released the lock. A client whose outbox
        overflowed is marked too_slow by queue_bytes(); _send_queued() drops it.
        event: the same, as data for the Redis link (see its section).
        notice: a join, leave or rename line, sent a moment later by the
        notices thread (see Notices); nothing is queued now, and the list is empty.
        """
        if isinstance(lines, str):
            lines = [lines]
        if self._said_goodbye:
            return []  # everyone has been queued "Server is shutting down.": nothing after it
        if event is not None and self._link is not None and \
                self._link.takes(event, lines, exclude):
            return []  # Redis link: shown when it comes back, in the one order
        # Queuing for everyone while holding the lock is what gives every
        # client the same order of events. queue_bytes() never waits and never
        # touches a socket: the sending happens in _send_queued(), after the lock.
        self._history.extend(lines)
        for line in lines:
            self.recorder.note("room", line)
        if notice:
            self.notices.add(lines, exclude)
            return []
        # Waiting notices go first (to the sender too, who is sent them now).
        everyone = self.notices.catch_up_everyone() if self.notices.lines else None
        recipients = [client for client in self._joined.values() if client is not exclude]
        # The bytes are built once per kind of client (TCP lines, WebSocket
        # frames), not once per client: a big room stays cheap.
        encoded = {}  # client.encode_lines -> its bytes for these lines
        for client in recipients:
            data = encoded.get(client.encode_lines)
            if data is None:
                data = encoded[client.encode_lines] = client.encode_lines(lines)
            client.queue_bytes(data)
        return recipients if everyone is None else everyone

    def _queue_for(self, client, line):
        """Queue a line for one client only (lock held), after the waiting
        notices it lacks: a reply never overtakes a join that came first."""
        self.notices.catch_up(client)
        client.queue_line(line)

    def _send_queued(self, clients):
        """Send what was queued for clients, and drop any that were too slow.

        Called after the room's lock is released: this touches sockets. When
        several threads queue lines at once, one send here often carries
        lines that others queued meanwhile.
        """
        if self._link is not None:  # Redis link: our events to Redis first
            self._link.send_outbox()
        for client in clients:
            if client.too_slow:
                self.drop_too_slow(client)
            else:
                client.flush()

    # -- Joining and leaving --

    def join(self, client, name):
        """Add a client to the room as name; return why not, or None."""
        name = unicodedata.normalize("NFC", name)  # checked as it will be shown
        problem = name_problem(name)
        if problem:
            return problem
        key, looks = fold_name(name), looks_of(name)
        with self._lock:  # before claiming it in Redis: a look-alike is refused here
            problem = self._name_taken(key, looks, client)
        if problem:
            return problem
        if self._link is not None:  # Redis link: claim the name on every server
            problem = self._link.claim_name(name, key)
            if problem:
                return problem
        with self._lock:
            if self._said_goodbye:
                return SHUTTING_DOWN  # its name came as the teacher stopped the server
            if self.addresses.ban_left(client.host) > 0:
                return REMOVED  # kicked while this connection was asking a name
            problem = self._name_taken(key, looks, client)
            if problem:
                return problem
            client.name, client.key, client.looks = name, key, looks
            client.joined_at = time.monotonic()
            client.muted = self.addresses.is_muted(client.host, key, self._keys_from) or (
                self._link is not None and key in self._link.muted_keys)  # Redis link
            # Notices so far count as given: its list of who is online says
            # what they said (and the history shows the latest of them).
            client.notices_seen = self.notices.count()
            if self._link is not None:  # Redis link: so do our events still on their way
                self._link.welcomed(client)
            self._add_client(client)
            # Welcome and history are queued, and the join line handed to
            # Notices, in one critical section: the newcomer sees each room
            # event at most once: in the history, or live. As one item,
            # so that it may be longer than --sendq (see Client._queue()).
            client.queue_bytes(client.encode_lines(self._welcome_lines(client)))
            event = {"k": "join", "name": name}
            self._broadcast(event_lines(event), exclude=client, event=event, notice=True)
            if client.muted:
                self.recorder.note("console", "%s joined muted (/unmute %s lifts it)."
                                   % (name, name))
        self._send_queued([client])
        return None

    def _welcome_lines(self, client):
        """The lines a newcomer sees first (lock held)."""
        lines = ["*** Welcome, %s! Type to chat; /help lists the commands." % client.name]
        if self._history:
            lines.append("*** What was said before you came:")
            lines.extend(self._history)
        lines.append(self._online_line())
        if self._link is not None and not self._link.linked:  # Redis link, split now
            lines.append(SPLIT_LINE)
        if client.muted:  # told now, not at their first line (and the teacher: see join())
            lines.append(MUTED_LINE)
        return lines

    def _online_line(self):
        names = self._names_in_order
        if self._remote:  # Redis link: students on other servers too
            names = [name for _, name in sorted(
                list(zip(self._keys_in_order, self._names_in_order))
                + [(key, student.name) for key, student in self._remote.items()])]
        return "*** Online now (%d): %s" % (len(names), ", ".join(names))

    def _name_taken(self, key, looks, client):
        """Why no one may take a name now (lock held), or None if it is free."""
        holders = [self._joined.get(key), self._remote.get(key)]  # Redis link: elsewhere too
        for look in looks:
            holders += [self._joined.get(self._looks.get(look)),
                        self._remote.get(self._remote_looks.get(look))]
        holder = next((holder for holder in holders
                       if holder is not None and holder is not client), None)
        if holder is None:
            return None
        if fold_name(holder.name) == key:
            return NAME_TAKEN % holder.name
        return LOOKS_TAKEN % holder.name

    def _add_client(self, client):
        """Put a client in the room's dict under its key (lock held)."""
        self._joined[client.key] = client
        for look in client.looks:
            self._looks[look] = client.key
        # Kept sorted as it changes: sorting them at every join costs a big
        # class dearly (a join still lists them once, for "Online now").
        place = bisect.bisect_left(self._keys_in_order, client.key)
        self._keys_in_order.insert(place, client.key)
        self._names_in_order.insert(place, client.name)

    def _remove_client(self, client):
        """Take a client out of the room's dict (lock held)."""
        del self._joined[client.key]
        for look in client.looks:
            del self._looks[look]
        place = bisect.bisect_left(self._keys_in_order, client.key)
        del self._keys_in_order[place], self._names_in_order[place]

    def leave(self, client):
        """Take client out of the room and tell the others, once, whatever the cause
        (nothing is said once the room has said goodbye: see close_room())."""
        with self._lock:
            if client.key is None or self._joined.get(client.key) is not client:
                return  # never joined, or has left already
            self.notices.catch_up(client)  # what it was told last is what happened last
            self._remove_client(client)
            # A muted student's reason, or anyone's in quiet mode, is not shown.
            reason = "" if client.muted or self._quiet else client.leave_reason
            event = {"k": "leave", "name": client.name, "reason": reason}
            recipients = [] if self._said_goodbye else self._broadcast(
                event_lines(event), exclude=client, event=event, notice=True)
        self._send_queued(recipients)

    def drop_too_slow(self, client):
        """Disconnect, now, a client whose outbox overflowed; it leaves the room.

        The console is told, and so is the student when they come back (greet()).
        """
        if not client.claim_drop():
            return  # dropped already
        self.tell_console("Disconnecting %s: %s" % (client, TOO_SLOW), warning=True)
        self.addresses.note_dropped(client.host, client.name)
        self.leave(client)
        client.close_now()

    def before_reply(self, client):
        """Queue for client the notices it has not been given (takes the lock):
        a reply to it comes after them (see ChatHandler.reply())."""
        with self._lock:
            self.notices.catch_up(client)


# --- Client: one connection's outbox and writer thread ------------------------
# What the room queues for one connection, and how it is sent without any
# thread waiting on a student who stopped reading.


class Client:
    """One connection: its name once joined, its outbox and its writer thread.

    Sending to a client never waits. queue_bytes() and queue_line() only put
    bytes in the outbox (the room calls them while holding its lock); flush()
    then sends what is queued, as far as the socket takes it at once (the
    usual case: no other thread has to wake up); send_bytes() and
    send_line() do both. If the socket is full, the rest stays queued and
    the writer thread, the only code that ever waits to send on this
    socket, sends it when there is room. One thread at a time sends, so
    bytes never interleave.
    The reader (ChatHandler) is the only code that reads the socket.

    Closing: close_when_sent() lets the outbox drain first (a goodbye line),
    for SHUTDOWN_GRACE_SECONDS at most (a download: longer); close_now() drops it (a stalled
    client). Either way, the socket is shut down (doing it twice is
    harmless) and closed is set.
    """

    def __init__(self, sock, address, sendq_bytes):
        self.sock = sock  # non-blocking: see ChatHandler.setup()
        self.address = address
        self.host = normal_host(address[0])  # for limits, bans and mutes
        self.name = None  # set by the room when the client joins or renames
        self.key = None  # fold_name(name): the key in the room's dict
        self.looks = ()  # looks_of(name): no look-alike may join
        self.joined_at = None
        self.leave_reason = ""  # from /quit REASON: shown in the leave line
        self.renames = None  # a RateWindow for /nick, set by the handler
        self.muted = False  # set by the teacher; the room checks it
        self.too_slow = False  # its outbox overflowed: the room drops it
        self.notices_seen = 0  # how many of the room's notices it was given: see queue_notices()
        self.sendq_bytes = sendq_bytes
        # How this client's lines become bytes, and what it joined with: a
        # browser's WebSocket changes both (see answer_http()).
        self.encode_lines = encode_lines
        self.via = "tcp"  # or "browser"
        self.closing_bytes = b""  # sent last, before closing (a WebSocket close frame)
        self._outbox = collections.deque()  # bytes not yet sent
        self._outbox_bytes = 0  # queued, or being sent
        self._oversized = 0  # what is left to send of a piece longer than --sendq
        # The client's own lock: it guards the outbox, notices_seen and the
        # flags below, and is taken inside the room's lock (never the other
        # way round). A plain Lock, as it is taken a few times per line per
        # client: a Condition's own "with" costs a Python call each time.
        self._outbox_lock = threading.Lock()
        # The writer thread waits on this for work (it shares the lock).
        self._writer_needed = threading.Condition(self._outbox_lock)
        self._sending = False  # one thread has taken bytes out and is sending them
        self._backlogged = False  # the socket was full: the writer sends until empty
        self._urgent = False  # more than notices are queued: see _take_batch()
        self._nagle = False  # True while Nagle's algorithm is on: see _take_batch()
        self._closing = False  # closing, or too slow: it takes no more data (close_when_sent())
        self._give_up_at = None  # ...and when the writer stops waiting to send the rest
        self._dropped = False  # the room's drop_too_slow() has run for this client
        self.closed = threading.Event()  # set once the socket is shut down
        # Started the first time it is needed (a full socket, or closing):
        # most clients never need one, and a thread costs memory.
        self._writer = None

    def __str__(self):
        where = format_address(self.address)
        return "%s (%s)" % (self.name, where) if self.name else where

    def queue_bytes(self, data):
        """Queue bytes for this client; False if that made the outbox overflow.

        Never waits and never touches the socket, so the room may call it
        while holding its lock. An overflowing client is too slow: its outbox
        is emptied and takes nothing more, and the room must drop it.
        """
        with self._outbox_lock:
            return self._queue(data)

    def _queue(self, data, can_wait=False):
        """queue_bytes() with this client's lock held. can_wait: join, leave or
        rename lines only, which may leave a little later (_take_batch())."""
        if self._closing:
            return True  # it is being disconnected: nothing more to send
        # Too slow if what waits would pass --sendq, not counting one piece
        # longer than that (a long history, a pasted page): it goes to a
        # reader that keeps up, and while it is sent, --sendq more may wait.
        longer = len(data) if len(data) > self.sendq_bytes else 0
        if self._outbox_bytes + len(data) > self.sendq_bytes + max(self._oversized, longer):
            self._closing = self.too_slow = True
            self._outbox.clear()
            self._writer_needed.notify()
            return False
        self._oversized = max(self._oversized, longer)
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._urgent = self._urgent or not can_wait
        return True

    def _count_sent(self, count):
        """count bytes of the outbox went out (this client's lock held)."""
        self._outbox_bytes -= count
        # (Counted as if these were the long piece's: the room behind it only shrinks.)
        self._oversized = max(0, self._oversized - count) if self._outbox_bytes else 0

    def queue_line(self, text):
        """Queue one line (see queue_bytes())."""
        return self.queue_bytes(self.encode_lines([text]))

    def flush(self, batch=None):
        """Send what is queued, as far as the socket takes it now; never wait.

        Never call this while holding the room's lock: it uses the socket.
        batch: bytes the caller has taken out, with the turn to send them
        (_sending is set: see _take_batch() and queue_notices()).
        """
        while True:
            if batch is None:
                with self._outbox_lock:
                    if self._sending or self._backlogged or not self._outbox:
                        return  # nothing to do, or another thread is on it
                    batch = self._take_batch()
            sent = self._send_what_fits(batch)
            with self._outbox_lock:
                self._sending = False
                self._count_sent(sent)
                if sent < len(batch):
                    self._outbox.appendleft(batch[sent:])
                    # Begun with TCP_NODELAY (it has a chat line): so is its rest.
                    self._urgent = self._urgent or not self._nagle
                    self._backlogged = True  # the socket is full: over to the writer
                handing_over = self._backlogged or self._closing
                more = bool(self._outbox)  # queued while we were sending
            if handing_over:
                self._wake_writer()
                return
            if not more:
                return
            batch = None

    def _wake_writer(self):
        """Wake the writer thread, starting it the first time (never under a lock)."""
        with self._outbox_lock:
            writer, starting = self._writer, self._writer is None
            if starting:
                writer = self._writer = threading.Thread(
                    target=self._run_writer, daemon=True,
                    name="writer %s" % format_address(self.address))
            else:
                self._writer_needed.notify()
        if starting:
            try:
                writer.start()
            except RuntimeError as error:  # no thread could start: too many
                # Without its writer this client can never be sent the rest:
                # close it, and leave the thread that queued it unharmed.
                log.error("Cannot start a writer for %s: %r", self, error)
                self.close_now()

    def send_bytes(self, data):
        """queue_bytes(), then flush(): never waits; False if this overflowed the outbox.

        Never call this while holding the room's lock: it uses the socket.
        """
        queued = self.queue_bytes(data)
        self.flush()
        return queued

    def send_line(self, text):
        """queue_line(), then flush() (see send_bytes())."""
        return self.send_bytes(self.encode_lines([text]))

    def claim_drop(self):
        """True the first time only: so a client is dropped once."""
        with self._outbox_lock:
            first, self._dropped = not self._dropped, True
            return first

    def _send_what_fits(self, data):
        """Send as much of data as the socket takes without waiting; return how much."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0  # the socket is full
        except OSError:
            return len(data)  # the peer is gone; its reader sees that and leaves

    def close_when_sent(self, give_up_after=SHUTDOWN_GRACE_SECONDS):
        """Take no more data; send what is queued, then close (never under a lock).

        What is still unsent give_up_after seconds from now is dropped (the
        soonest such time counts, if called again): else a kicked student
        whose nc is suspended would hold their place, and a thread, for as
        long as they like. A download waits longer (send_http_answer()).
        """
        give_up_at = time.monotonic() + give_up_after
        with self._outbox_lock:
            if self.closing_bytes and not self._closing:
                self._outbox.append(self.closing_bytes)
                self._outbox_bytes += len(self.closing_bytes)
            if self._give_up_at is None or give_up_at < self._give_up_at:
                self._give_up_at = give_up_at
            self._closing = True
        self.flush()
        with self._outbox_lock:
            done = not (self._outbox or self._sending or self._backlogged)
        if done and self._writer is None:
            self._shut_down_socket()  # nothing was queued: no thread needed to close
        else:
            self._wake_writer()

    def close_now(self):
        """Close now, dropping the outbox: wakes both threads if they are waiting."""
        with self._outbox_lock:
            self._closing = True
            self._outbox.clear()
            self._writer_needed.notify()
        self._shut_down_socket()

    def wait_closed(self, timeout):
        """Wait until the socket is shut down (all sent, or given up); True if so."""
        return self.closed.wait(timeout)

    def sleep(self, seconds):
        """Wait seconds, or less if this connection closes meanwhile.

        Pacing and delays use it, so a client that is kicked, dropped or shut
        down while it waits is not kept waiting for nothing.
        """
        self.closed.wait(seconds)

    def _next_batch(self):
        """Wait until the writer is needed; return the bytes to send, or None to stop."""
        with self._outbox_lock:
            while self._sending or not (self._backlogged or self._closing):
                self._writer_needed.wait()
            if not self._outbox:
                self._backlogged = False
                return None if self._closing else b""
            return self._take_batch()

    def _take_batch(self):
        """Take all that is queued, as one bytes, and the turn to send it (lock held).

        Lines queued while another thread was sending go out together here.
        """
        batch = b"".join(self._outbox)
        self._outbox.clear()
        self._sending = True
        # A chat line leaves at once (TCP_NODELAY). Notices alone may wait:
        # with Nagle's algorithm on, the OS holds a small send while what it
        # sent before is not yet acknowledged, and merges them, so a class
        # joining costs far fewer packets (a reader that keeps up acknowledges
        # at once, and still gets them at once).
        if self._nagle == self._urgent:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                     1 if self._urgent else 0)
                self._nagle = not self._urgent
            except OSError:
                pass  # closed, or not TCP: this batch goes out as it is
        self._urgent = False
        return batch

    def _run_writer(self):
        # Woken only when the socket was full (or at the end): then it waits
        # for room, and sends everything queued meanwhile in one go.
        writable = OneSocketSelector()
        try:
            # Inside the try: the socket may have been closed already (a
            # kick during a burst), and register() then raises ValueError.
            writable.register(self.sock, selectors.EVENT_WRITE)
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                if not batch:
                    continue  # the backlog is gone: back to waiting
                rest = memoryview(batch)
                rest = rest[self._send_what_fits(rest):]
                while rest and not self.closed.is_set():
                    if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                        return  # closing, and it stopped reading: the rest is dropped
                    writable.select(WRITER_CHECK_SECONDS)  # wait for room in the socket
                    rest = rest[self._send_what_fits(rest):]
                with self._outbox_lock:
                    self._sending = False
                    self._count_sent(len(batch))
        except (OSError, ValueError):
            pass  # the socket is closed: nothing more can be sent
        except Exception as error:  # a thread's top level: log it, never a traceback
            log.error("Writer for %s failed: %r", self, error)
        finally:
            writable.close()
            self._shut_down_socket()

    def _shut_down_socket(self):
        # shutdown() (not close()) wakes a thread waiting on this socket;
        # socketserver closes the socket when the handler is done.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut down, or the peer reset it
        self.closed.set()

    # -- The room's join and leave lines (see Notices, after the core) --

    def queue_notices(self, first, encoded, shared=None, send=False):
        """Queue the room's notices this client was not given; False if that overflowed.

        encoded: the room's waiting join, leave and rename lines, each
        encoded for this client, numbered from first; notices_seen counts
        those this client was given. Two threads may try at once: the
        notices thread (which holds no room lock while it sends) and the
        room, before it queues anything else for this client (see
        Notices.catch_up()). Checked and counted under this client's lock,
        each notice is queued once, by whichever comes first, and in order.
        shared: a dict, to build the bytes once for the many clients that
        lack the same notices. send: send what is queued now too, unless
        another thread is sending (never with the room's lock held).
        """
        end = first + len(encoded)
        batch = None
        with self._outbox_lock:
            seen = self.notices_seen
            if seen < end:
                self.notices_seen = end
                skip = max(0, seen - first)
                if shared is None:
                    data = b"".join(encoded[skip:])
                else:
                    data = shared.get((self.encode_lines, skip))
                    if data is None:
                        data = shared[self.encode_lines, skip] = b"".join(encoded[skip:])
                if send and self._nagle and len(data) <= self.sendq_bytes and not (
                        self._outbox or self._sending or self._backlogged or self._closing):
                    # The usual case, a big class joining: nothing else is
                    # queued and nobody is sending, so the outbox is skipped
                    # (one lock, one send). Nagle is on: the batch is notices only.
                    self._sending, self._outbox_bytes, batch = True, len(data), data
                elif not self._queue(data, can_wait=True):
                    return False
            if batch is None:
                if not send or self._sending or self._backlogged or not self._outbox:
                    return True
                batch = self._take_batch()
        self.flush(batch)
        return True

    def skip_notices(self, first, count):
        """Count count notices from number first as given, if all before them were."""
        with self._outbox_lock:
            if self.notices_seen == first:
                self.notices_seen = first + count


# =============================================================================
# Speed for a big class: join, leave and rename lines in bulk (Notices).
# Sending each at once, like a chat line, would be as correct; this makes a
# class of thousands join fast.
# =============================================================================

# Sent at once, like a chat line, each join would cost one send to each of N
# clients: N*N small packets for a class of N joining. So join, leave and
# rename lines (notices) wait in the room's Notices, and its thread gives them
# out: those that came while it was giving out the last ones go out together,
# one send per client for a whole burst. A round that new notices interrupt
# starts again from the top: the clients it reaches first get each notice at
# once, and the rest all of theirs in one send, NOTICES_LATE_SECONDS and one
# round's time later, which nobody notices. Each round costs a send per client
# it reaches, so a class that joins while thousands are in the room costs the
# late part of the room one send per NOTICES_LATE_SECONDS, not one per join.
# It hooks into the core where the room broadcasts (a notice is added, and
# anything else first catches its clients up), queues a line for one client
# (_queue_for()) or replies (before_reply()), where a client joins (it counts
# the waiting ones as given) and leaves, and in Client.queue_notices().


class Notices:
    """The room's join, leave and rename lines not yet given to every client.

    The order never changes: anything else queued for a client (a chat line,
    a reply, a goodbye) first queues the notices it lacks (catch_up()). The
    thread gives them out without holding the room's lock, so a chat line
    never waits for a big class to be told of a join; each client's own lock
    decides which of the two queues a notice (Client.queue_notices()). The
    room's lock guards lines, _added_at, before and the encoded copies.
    """

    def __init__(self, room):
        self.room = room
        # In the room's order. A client's notices_seen counts those it has
        # been given, out of count().
        self.lines = []
        self._added_at = []  # when each line in lines came (time.monotonic())
        self.before = 0  # notices given to everyone and forgotten
        # encode_lines -> the waiting notices, each encoded so: a catch-up
        # joins bytes, however many are waiting (see _encoded_lines()).
        self._encoded = {}
        self.added = threading.Event()  # set when lines are added: the thread wakes
        self._stopping = False  # set once, by stop(): the thread ends
        self._thread = threading.Thread(target=self._run, name="notices", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """End the thread (it finishes a round it is in)."""
        self._stopping = True
        self.added.set()

    def count(self):
        """How many notices there have been (lock held)."""
        return self.before + len(self.lines)

    def add(self, lines, exclude):
        """Put join, leave or rename lines on the waiting list (lock held)."""
        if exclude is not None:  # not for the student they are about
            self.skip(exclude, len(lines))
        self.lines.extend(lines)
        self._added_at.extend([time.monotonic()] * len(lines))
        self.added.set()

    def skip(self, client, count):
        """Count the next count notices as given to client, who is given those
        before them now (lock held): it knows of them already."""
        self.catch_up(client)
        client.skip_notices(self.count(), count)

    def catch_up(self, client, shared=None):
        """Queue for one joined client the notices it has not been given (lock held).

        Called before anything else is queued for it, so it sees them first.
        shared: see queue_notices(), when catching up many clients.
        """
        # notices_seen is read here without the client's lock, to skip the
        # lock for a client that has them all: it only ever grows.
        if client.notices_seen < self.count() and self.room._joined.get(client.key) is client:
            client.queue_notices(self.before, self._encoded_lines(client.encode_lines), shared)

    def catch_up_everyone(self):
        """Queue the waiting notices for every joined client; return them all (lock held)."""
        clients = list(self.room._joined.values())
        shared = {}
        for client in clients:
            self.catch_up(client, shared)
        return clients

    def _encoded_lines(self, encode):
        """The waiting notices, each encoded with encode (lock held).

        Kept, and only new notices encoded: while a big class leaves at once,
        every leaver is caught up, and would otherwise encode all that wait.
        """
        encoded = self._encoded.setdefault(encode, [])
        if len(encoded) < len(self.lines):
            encoded.extend(encode([line]) for line in self.lines[len(encoded):])
        return encoded

    def _run(self):
        room = self.room
        behind_since = None  # when the oldest line not given to everyone came
        while True:
            self.added.wait()
            with room._lock:
                # Checked after clear(), under the lock: a stop that came just
                # before would otherwise have its wake-up cleared, and be missed.
                self.added.clear()
                if self._stopping:
                    return
                clients = list(room._joined.values())
                first, lines = self.before, self.lines[:]
                if behind_since is None and lines:
                    behind_since = self._added_at[0]
            if not lines:
                continue  # (woken for lines a finished round gave out already)
            try:
                if not self._send_round(clients, first, lines, behind_since):
                    continue  # new notices came: begin again from the top
            except Exception as error:  # a thread's top level: log it, and go on
                log.error("Sending join and leave lines failed: %r", error)
                time.sleep(NOTICES_RETRY_SECONDS)
                self.added.set()  # they stay waiting: try again
                continue
            behind_since = None
            with room._lock:
                # Everyone has them now (a newcomer had them in its history):
                # forget them.
                del self.lines[:len(lines)]
                del self._added_at[:len(lines)]
                for encoded in self._encoded.values():
                    del encoded[:len(lines)]
                self.before = first + len(lines)

    def _send_round(self, clients, first, lines, behind_since):
        """Queue and send notices (numbered from first) to each client that lacks them.

        Return False, with some clients not reached, if new notices came
        meanwhile and those clients have waited less than NOTICES_LATE_SECONDS.
        """
        encoded = {}  # encode_lines -> the lines, each encoded so
        shared = {}  # see queue_notices()
        hurry_until = behind_since + NOTICES_LATE_SECONDS
        for client in clients:
            if self.added.is_set() and time.monotonic() < hurry_until:
                return False
            kind = client.encode_lines
            if kind not in encoded:
                encoded[kind] = [kind([line]) for line in lines]
            # too_slow too: a catch-up that no send follows (the Redis echo of
            # its own join) may have overflowed its outbox.
            if not client.queue_notices(first, encoded[kind], shared, send=True) \
                    or client.too_slow:
                self.room.drop_too_slow(client)
        return True


# =============================================================================
# What protects the room: clean text, names nobody can fake, limits, the
# greeting and the password, refusals. The core calls them where a client
# arrives (ChatHandler.setup() and handle()), reads (take_bytes(), chat(),
# handle_line()), joins (ChatRoom.join()) and
# speaks (_speak()), and where ChatServer admits a connection
# (process_request()).
# =============================================================================

# --- Text helpers: bytes in, clean lines out ----------------------------------
# ChatHandler.take_bytes() passes what it reads to TelnetLines, which uses
# TelnetFilter, LineFramer and clean_line(); ChatRoom.join() checks names here.

# Telnet commands (RFC 854). A telnet client may send these glued to the
# front of a line; we remove them and refuse every option.
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP = 244  # "interrupt process": what telnet sends for Ctrl+C
# Linux's telnet (inetutils), out of BINARY mode (which we never ask for:
# we start no negotiation), reads a typed byte of 0x80 and above as a
# control key without its top bit: the 0x83 of the Cyrillic "у" or Greek
# "σ" goes out as IAC IP (Ctrl+C), and so on. In the middle of a UTF-8
# character, these commands are those bytes.
MANGLED_BYTES = {IP: 0x83, 245: 0x8F, 243: 0x9C, 237: 0x9A}  # IP, AO, BRK, SUSP

LINE_END = re.compile(rb"\r\n|\r\0|\r|\n")  # telnet, telnet char mode, Mac, nc

# Whole escape sequences, so that no "[A" is left behind when an arrow key's
# ESC is removed: CSI (cursor keys, colours, clear screen), SS3 (F1 to F4 and
# the keypad: ESC O P), then the string sequences (OSC window titles, DCS,
# ...), then two-byte escapes (ESC c).
ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1bO|\x8f)[0-?]*[@-~]"
    r"|(?:\x1b[]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)
# Shown as spaces: a tab, and U+2028 and U+2029, which editors take for line ends.
LINE_BREAKING_SPACES = re.compile("[\t\u2028\u2029]")
# C0, DEL and C1 controls, and the bidi overrides that make text run backwards.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Characters a terminal shows as nothing: names may not hold them, and between
# two asterisks they would still let "***" show.
INVISIBLE = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
INVISIBLE_CHARACTERS = re.compile("[%s]" % INVISIBLE)
# What shows as an asterisk: "*", the forms NFKC turns into one, and signs
# drawn alike (asterisk operator, low, heavy and open asterisks, Arabic star).
ASTERISKS = re.compile("[*\ufe61\uff0a\u2217\u204e\u066d\u229b\u29c6\u2722-\u2725"
                       "\u2731-\u2733\u273a-\u273d\u2743\u2749-\u274b\ua673"
                       "\U0001f7af-\U0001f7bf]")
ASTERISK_GROUPS = str.maketrans({"\u2042": "***", "\u2051": "**"})  # ⁂ is three, ⁑ two
# Between two asterisks, these still let "***" show: a mark sits on a
# neighbour (Mn, Me), a format character shows as nothing (Cf).
HIDDEN_CATEGORIES = ("Mn", "Me", "Cf")
ERASE_CHARACTERS = "\b\x7f"  # backspace and DEL, as character-mode clients send

HTTP_REQUEST = re.compile(r"^[A-Z]+ \S+ HTTP/\d\.\d$")


class TelnetFilter:
    """Removes telnet commands from a byte stream and answers them with a refusal.

    A command inside a UTF-8 character is a byte of it (see MANGLED_BYTES).
    """

    def __init__(self):
        self._state = "data"
        self._verb = 0
        self.interrupted = False  # an IAC IP came: the user pressed Ctrl+C
        self._tail = b""  # the last bytes of text: does a UTF-8 character go on?

    def feed(self, data):
        """Return (the data without telnet commands, the bytes to answer with)."""
        if self._state == "data" and IAC not in data:
            # The usual case: nothing to look at byte by byte. After a Ctrl+C
            # (the client is leaving) no text counts.
            if self.interrupted:
                return b"", b""
            self._tail = (self._tail + data[-3:])[-3:]
            return data, b""
        text, answer = bytearray(), bytearray()
        for byte in data:
            self._step(byte, text, answer)
        self._tail = (self._tail + bytes(text[-3:]))[-3:]
        return bytes(text), bytes(answer)

    def _in_a_character(self, text):
        """True if the text so far ends inside a UTF-8 character."""
        tail = (self._tail + bytes(text[-3:]))[-3:]
        for back, byte in enumerate(reversed(tail), 1):
            if byte < 0x80:
                return False
            if byte >= 0xC0:  # a lead byte: how long is its character?
                return back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4)
        return False

    def _step(self, byte, text, answer):
        state = self._state
        if state == "data":
            if byte == IAC:
                self._state = "command"
            elif not self.interrupted:
                text.append(byte)
        elif state == "command":
            self._state = "data"
            if byte == IAC and not self.interrupted:
                text.append(IAC)  # IAC IAC is a literal 255 byte
            elif byte in (DO, DONT, WILL, WONT):
                self._verb, self._state = byte, "option"
            elif byte == SB:
                self._state = "subnegotiation"
            elif byte in MANGLED_BYTES and self._in_a_character(text):
                text.append(MANGLED_BYTES[byte])  # a letter, not a key (see above)
            elif byte == IP:
                self.interrupted = True
            # Anything else is a two-byte command (NOP, break, ...): ignored.
        elif state == "option":
            self._state = "data"
            # We refuse every option, and never answer a refusal (no loops).
            if self._verb == DO:
                answer += bytes([IAC, WONT, byte])
            elif self._verb == WILL:
                answer += bytes([IAC, DONT, byte])
        elif state == "subnegotiation":
            if byte == IAC:
                self._state = "subnegotiation-iac"
        else:  # "subnegotiation-iac"
            self._state = "data" if byte == SE else "subnegotiation"


class LineFramer:
    """Cuts a byte stream into lines at LF, CR LF, CR NUL or a bare CR.

    A line longer than max_bytes comes out once as TOO_LONG (as soon as it is
    known, so a client cannot make us buffer a megabyte), and the rest of it,
    up to its line end, is discarded.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._partial = bytearray()
        self._discarding = False
        self._after_cr = False  # a CR ended the last read: drop a LF or NUL next

    def feed(self, data):
        """Return the lines (bytes, without their ends) that data completes."""
        if self._after_cr and data[:1] in (b"\n", b"\0"):
            data = data[1:]  # the second half of a CR LF split across reads
        if data:
            self._after_cr = data.endswith(b"\r")
        *complete, rest = LINE_END.split(data)
        lines = []
        for piece in complete:
            lines.extend(self._end_line(piece))
        lines.extend(self._add_partial(rest))
        return lines

    def _end_line(self, piece):
        if self._discarding:
            self._discarding = False  # the too-long line ends here
            return []
        line = bytes(self._partial + piece)
        self._partial.clear()
        return [TOO_LONG] if len(line) > self.max_bytes else [line]

    def _add_partial(self, rest):
        if self._discarding:
            return []
        self._partial += rest
        if len(self._partial) <= self.max_bytes:
            return []
        self._partial.clear()
        self._discarding = True
        return [TOO_LONG]


class TelnetLines:
    """Makes a TCP connection (nc, telnet, PuTTY) a line stream to ChatHandler.

    take_bytes() takes bytes from the socket and returns the client's clean
    lines: str, TOO_LONG for a line over --max-line, TELNET_CTRL_C for telnet's
    Ctrl+C. It refuses telnet's options itself. (A browser's WebSocketLines,
    in "The browser page", does the same for WebSocket frames.)
    """

    def __init__(self, client, max_line):
        self.client = client  # for the answers to telnet's options
        self.max_line = max_line
        self.telnet = TelnetFilter()
        self.framer = LineFramer(max_line)

    def take_bytes(self, data):
        text, answer = self.telnet.feed(data)
        if answer:
            self.client.send_bytes(answer)  # refusals of telnet options
        lines = [line if line is TOO_LONG else self.clean(line)
                 for line in self.framer.feed(text)]
        if self.telnet.interrupted:  # Ctrl+C in telnet: leave, as /quit does
            lines.append(TELNET_CTRL_C)
        return lines

    def clean(self, raw):
        """clean_line(), and TOO_LONG if that made it too long for any server.

        Invalid UTF-8 grows as it becomes U+FFFD (one byte, three). Linked
        servers take a line up to REDIS_TEXT_BYTES (or their --max-line):
        past that, every one of them, this one too, would drop it.
        """
        line = clean_line(raw)
        if "\ufffd" in line and len(line.encode("utf-8")) > max(
                self.max_line, REDIS_TEXT_BYTES):
            return TOO_LONG
        return line


def erase_backspaces(text):
    """Apply backspace and DEL: each erases the character (code point) before it."""
    if not any(eraser in text for eraser in ERASE_CHARACTERS):
        return text
    kept = []
    for character in text:
        if character not in ERASE_CHARACTERS:
            kept.append(character)
        elif kept:
            kept.pop()
    return "".join(kept)


def clean_line(raw):
    """Decode one line from a client into text that is safe for any terminal.

    Invalid UTF-8 becomes U+FFFD; escape sequences go whole; backspaces erase;
    a tab becomes a space, and so do the Unicode line and paragraph separators
    (editors break lines there: a student could forge a transcript line);
    every other control character is removed.
    """
    text = raw.decode("utf-8", errors="replace")
    text = ESCAPE_SEQUENCE.sub("", text)
    text = erase_backspaces(text)
    text = LINE_BREAKING_SPACES.sub(" ", text)
    return CONTROL_CHARACTERS.sub("", text)


def trim_accents(text):
    """Keep at most MAX_MARKS_PER_LETTER combining marks on each letter.

    What a student says, does or whispers: "Zalgo" text stacks hundreds on
    one letter, which draw over the lines above and below it.
    """
    if text.isascii():
        return text  # the usual line: nothing to look at letter by letter
    kept, run = [], 0
    for character in text:
        category = unicodedata.category(character)
        if category[0] == "M":
            run += 1
        elif category != "Cf" and not INVISIBLE_CHARACTERS.match(character):
            run = 0  # a new letter (a joiner, drawn as nothing, is none: marks
            #          after it stack on the same letter)
        if run <= MAX_MARKS_PER_LETTER:
            kept.append(character)
    return "".join(kept)


def defuse_server_marker(text):
    """Make sure a student's text cannot show "***", the server's marker.

    Spaces are kept (pasted code needs them), so a long line can wrap in a
    terminal and start a row with whatever comes next; no row may look like
    the server speaking. Any run of three or more asterisks (and their
    full-width and small forms and look-alikes, and with invisible characters
    or marks between them) becomes two.
    """
    original = text
    if "\u2042" in text or "\u2051" in text:  # an asterism: three asterisks in one
        text = text.translate(ASTERISK_GROUPS)
    if len(ASTERISKS.findall(text)) < 3:
        return original  # the usual line: no run of three to look for
    pieces, run, stars = [], [], 0  # run: the asterisks so far, and what is between
    for character in text + "\n":  # (a line never holds "\n": it ends the last run)
        if ASTERISKS.match(character):
            run.append(character)
            stars += 1
        elif run and (INVISIBLE_CHARACTERS.match(character)
                       or unicodedata.category(character) in HIDDEN_CATEGORIES):
            run.append(character)
        else:
            pieces.append("**" if stars >= 3 else "".join(run))
            pieces.append(character)
            run, stars = [], 0
    return "".join(pieces)[:-1]


def student_text(text):
    """What the others are shown of a student's message, action, whisper or reason.

    Accents are trimmed first: trimming a mark that stood between two
    asterisks could make "***" show after the check.
    """
    return defuse_server_marker(trim_accents(text))


def says_nothing(text):
    """True for a line that shows as nothing: spaces, invisible characters, and
    marks or format characters with no letter to sit on (HIDDEN_CATEGORIES)."""
    return all(character.isspace() or unicodedata.category(character) in HIDDEN_CATEGORIES
               or INVISIBLE_CHARACTERS.match(character) for character in text)


def is_plain_message(text):
    """True for a line that is neither a /command nor a //escaped one."""
    return not text.lstrip().startswith("/")


def encode_line(text):
    """Encode one line for the wire: UTF-8, ended with CR LF for every terminal."""
    return (text + "\r\n").encode("utf-8")


def encode_lines(lines):
    """Encode lines for a TCP client (see Client.encode_lines)."""
    return b"".join(map(encode_line, lines))


def parse_command(line, commands):
    """Split '/word argument' into (the word, its function or None, the argument).

    commands maps each word to (function, arguments, what it does); case is ignored.
    """
    word, _, argument = line.strip()[1:].partition(" ")
    entry = commands.get(word.lower())
    return word, entry[0] if entry else None, argument.strip()


def describe_commands(commands):
    """One '/word USAGE   what it does' line per command, for /help."""
    return ["%-22s %s" % (("/%s %s" % (word, usage)).strip(), description)
            for word, (_, usage, description) in commands.items()]


# --- Names nobody can fake ----------------------------------------------------
# ChatRoom.join() and ChatServer.rename() refuse a name for which
# name_problem() has a reason, or one of whose looks_of() (its skeleton()
# and more) is one a student online already has, here or on a linked server.


def fold_name(name):
    """Return the key that two names share when they look alike (Alice, ａｌｉｃｅ)."""
    # NFKC folds width and compatibility forms; casefold then folds case
    # (ß -> ss), which can undo normalisation, hence NFKC a second time.
    return unicodedata.normalize(
        "NFKC", unicodedata.normalize("NFKC", name).casefold()
    )


def is_name_character(character):
    """A letter or combining mark of any script, a digit, or one of _ - ."""
    category = unicodedata.category(character)
    return category[0] in "LM" or category == "Nd" or character in "_-."


# Scripts that real names mix: Japanese (kanji with kana), Korean (hanja
# with hangul). Any other name is written in one script.
SCRIPT_MIXES = [{"CHINESE", "HIRAGANA", "KATAKANA"}, {"CHINESE", "HANGUL"}]

# Letters that look like a Latin letter, and the letter they look like. The
# standard library has no Unicode confusables table; this short one covers
# the look-alikes of Latin, Greek, Cyrillic and Armenian that a keyboard can
# type, and two modifier letters drawn as _ and . (ˍ, ꞏ).
LOOK_ALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "і": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
    "ԁ": "d", "һ": "h", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ь": "b", "г": "r",
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g", "զ": "q", "ա": "w",
    "ˍ": "_", "ꞏ": ".",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w",
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ʟ": "l", "ɪ": "i", "ᴀ": "a", "ʙ": "b",
    "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m",
    "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v",
    "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ǀ": "l", "ǁ": "ll", "ɩ": "i", "ɾ": "r", "ĸ": "k",
    "ꟾ": "l", "0": "o", "1": "l",
    # Lisu and Cherokee letters drawn as Latin capitals (ꓮꓡꓲꓚꓰ, ᎪᏞᎥᏟᎬ: ALICE)
    "ꓐ": "b", "ꓑ": "p", "ꓓ": "d", "ꓔ": "t", "ꓖ": "g", "ꓗ": "k", "ꓙ": "j", "ꓚ": "c",
    "ꓜ": "z", "ꓝ": "f", "ꓟ": "m", "ꓠ": "n", "ꓡ": "l", "ꓢ": "s", "ꓣ": "r", "ꓦ": "v",
    "ꓧ": "h", "ꓪ": "w", "ꓫ": "x", "ꓬ": "y", "ꓮ": "a", "ꓰ": "e", "ꓲ": "i", "ꓳ": "o",
    "ꓴ": "u", "Ꭰ": "d", "Ꭱ": "r", "Ꭲ": "t", "Ꭵ": "i", "Ꭹ": "y", "Ꭺ": "a", "Ꭻ": "j",
    "Ꭼ": "e", "Ꮃ": "w", "Ꮇ": "m", "Ꮋ": "h", "Ꮐ": "g", "Ꮒ": "h", "Ꮓ": "z",
    "Ꮟ": "b", "Ꮢ": "r", "Ꮤ": "w", "Ꮩ": "v", "Ꮪ": "s", "Ꮮ": "l", "Ꮯ": "c", "Ꮲ": "p",
    "Ꮶ": "k", "Ᏼ": "b",
})
NAME_DECORATIONS = re.compile(r"[\d_.-]")  # what "teacher_2." adds to "teacher"


def name_problem(name):
    """Say what is wrong with a name, or return None if it may be used."""
    if not name:
        return "A name needs at least one character."
    if len(name) > MAX_NAME_CHARS:
        return "That name is too long: at most %d characters." % MAX_NAME_CHARS
    if INVISIBLE_CHARACTERS.search(name):
        return "Names may not contain invisible characters."
    if unicodedata.category(name[0])[0] == "M" or not all(
        is_name_character(character) for character in name
    ):
        return "Names may use only letters, digits, _, - and . (no spaces)."
    if trim_accents(name) != name:  # more than MAX_MARKS_PER_LETTER on a letter
        return "Too many accents on one letter (at most %d)." % MAX_MARKS_PER_LETTER
    scripts = name_scripts(name)
    if len(scripts) > 1 and not any(scripts <= mix for mix in SCRIPT_MIXES):
        return "Write a name in one alphabet (this one mixes %s)." % " and ".join(
            sorted(script.title() for script in scripts))
    if is_reserved(name):
        return "The name %s is reserved." % name
    if is_ip_address(name):  # "127.0.0.9 says: ..." would have the teacher ban 127.0.0.9
        return "A name may not be, or look like, an address."
    return None


def is_reserved(name):
    """True if name reads as one of RESERVED_NAMES, however decorated.

    Accents are taken off, and all but the letters a to z: "teachér",
    "teacher_", "teacherˍ". Digits are taken off both after the skeleton
    ("r00t" is root) and before it (else "teacher1" would read as "teacherl").
    """
    bare = "".join(character for character in unicodedata.normalize("NFD", name)
                   if unicodedata.category(character)[0] != "M")
    forms = [skeleton(bare), skeleton(NAME_DECORATIONS.sub("", bare))]
    if any(re.sub("[^a-z]", "", form) in RESERVED_NAMES for form in forms):
        return True
    words = [re.sub("[^a-z]", "", skeleton(word)) for word in name_words(bare)]
    return any(word in RESERVED_WORDS for word in words)  # "the.teacher", "MrTeacher"


def name_words(name):
    """The words of a name: split at what NAME_DECORATIONS takes off (digits,
    _ . -), where case changes between two letters (TheTeacher, TEACHERbob)."""
    words, word = [], ""
    for character in name:
        if NAME_DECORATIONS.match(character):
            words.append(word)
            word = ""
            continue
        if (character.isupper() and word[-1:].islower()) or \
                (character.islower() and len(word) > 1 and word.isupper()):
            words.append(word)
            word = ""
        word += character
    return [word for word in words + [word] if word]


DIGIT_LOOK_ALIKES = str.maketrans("lIoO", "1100")  # for is_ip_address()


def is_ip_address(name):
    """True if name reads as an IP address: 10.0.0.9, but also l0.O.0.9 or １０.０.０.９."""
    text = ascii_digits(unicodedata.normalize("NFKC", name)).translate(DIGIT_LOOK_ALIKES)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def name_scripts(name):
    """The scripts of a name's letters (LATIN, CYRILLIC, CJK, ...), by Unicode name.

    The standard library has no script property, but a letter's Unicode name
    starts with its script: "CYRILLIC SMALL LETTER A". So does a mark of one
    script ("HEBREW POINT SHEVA", "THAI CHARACTER MAI HAN-AKAT"): on a Latin
    name it would pass for dirt on the screen. Digits, _-. and the accents
    any script may carry ("COMBINING ACUTE ACCENT") belong to no script.
    """
    scripts = set()
    for character in unicodedata.normalize("NFKC", name):
        words = unicodedata.name(character, "UNKNOWN").split()
        kind = unicodedata.category(character)[0]
        if kind != "L" and (kind != "M" or words[0] == "COMBINING"):
            continue
        if words[0] in ("HALFWIDTH", "FULLWIDTH"):
            words = words[1:]
        if words[0] == "CJK":
            words[0] = "CHINESE"
        if words[0] not in ("MODIFIER", "KATAKANA-HIRAGANA"):  # shared by scripts
            scripts.add(words[0])
    return scripts


def skeleton(name):
    """What a name looks like: look-alike letters become the letter they mimic.

    Two names with the same skeleton (alice, аlice with a Cyrillic а, alıce,
    ᴀlice, b০b with a Bengali zero) cannot both be online. It is built from
    the folded name, so that names that fold alike (Alice, alice) also share
    a skeleton.
    """
    text = fold_name(ascii_digits(unicodedata.normalize("NFKC", name))).translate(LOOK_ALIKES)
    return text.replace("rn", "m").replace("vv", "w")


def ascii_digits(text):
    """text with each digit of any script (০, the Bengali zero) as the one it stands for."""
    return "".join(str(unicodedata.decimal(character)) if character.isdecimal() else character
                   for character in text)


# A capital I looks like a small l in most fonts (aIice, alice), but folds to
# an i; and the Cyrillic and Greek capitals I look just like it.
CAPITAL_I_AS_L = str.maketrans({"I": "l", "\u0406": "l", "\u0399": "l", "\u04c0": "l",
                                "\ua4f2": "l",  # ...and the Lisu I, and Latin's
                                "\u0196": "l", "\ua7ae": "l"})  # capital iota, small capital I


def looks_of(name):
    """The two looks of a name; no two online names may share either.

    The first is its skeleton(), which folds case. The second keeps case, and
    reads each capital I as the small l it looks like: aIice looks like
    alice, and Ian like lan, but Ian not like Lan, nor AIDA like Alda
    (folded, I is an i and L an l).
    """
    text = ascii_digits(unicodedata.normalize("NFKC", name))
    as_typed = text.translate(CAPITAL_I_AS_L).translate(LOOK_ALIKES)
    return ("folded", skeleton(name)), ("as typed", as_typed.replace("rn", "m").replace("vv", "w"))


# --- Limits: per connection, per computer, for the whole room -----------------
# FloodLimiter paces one connection's lines and bytes (ChatHandler), ByteBudget
# the whole room (ChatServer._wait_for_room_budget()), and Addresses counts
# what each computer does (ChatServer.process_request(), the teacher's bans).


class FloodLimiter:
    """A token bucket: `burst` lines at once, then `rate` lines a second.

    The same bucket paces bytes: ChatHandler's input_pace takes one token
    per byte read (delay_for(len(data))).
    """

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def delay_for(self, cost=1):
        """Take one line's token (or cost tokens); return how long to hold it back (s)."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        self._tokens -= cost  # below zero, the line is waiting for a token
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take_if_free(self):
        """Take a token only if one is free now; True if it was."""
        if self.rate <= 0:
            return True
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def is_full(self):
        """True if the bucket is full again: as good as a new one."""
        self._refill()
        return self._tokens >= self.burst

    def _refill(self):
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now


class ByteBudget:
    """A FloodLimiter in bytes that many threads share (the room-wide budget)."""

    def __init__(self, rate, burst):
        self.active = rate > 0  # 0: no budget at all
        self._bucket = FloodLimiter(rate, burst)
        self._lock = threading.Lock()  # guards _bucket

    def delay_for(self, size):
        """Take size bytes; return how long the sender must wait first (seconds)."""
        with self._lock:
            return self._bucket.delay_for(size)


class RateWindow:
    """Allows at most `limit` events in any `seconds`-long window (0: no limit)."""

    def __init__(self, limit, seconds, clock=time.monotonic):
        self.limit = limit
        self.seconds = seconds
        self.clock = clock
        self._times = collections.deque()

    def allow(self):
        """Record one event and return True, or return False if over the limit."""
        if self.full():
            return False
        if self.limit > 0:
            self._times.append(self.clock())
        return True

    def full(self):
        """True if one more event now would be over the limit (nothing is recorded)."""
        if self.limit <= 0:
            return False
        now = self.clock()
        while self._times and now - self._times[0] >= self.seconds:
            self._times.popleft()
        return len(self._times) >= self.limit


# ChatHandler's pacing of each connection's lines, with FloodLimiter: chat()
# and ask_name() call pace_flood(), handle_line() calls more_messages().


def pace_flood(handler, blank=False):
    """Delay this client's next line if it is sending too fast.

    blank: the line says nothing (says_nothing()). The blank lines right
    behind it are dropped, so that a run of them is paced as one line: else
    a student who sent thousands and closed would stay in the room for as
    many fifths of a second. (Real lines are all paced, and all sent.)
    """
    while blank and handler.received and isinstance(handler.received[0], str) and \
            says_nothing(handler.received[0]):
        handler.received.popleft()
    delay = handler.flood.delay_for()
    if delay <= 0:
        handler.told_flood = False  # it slowed down: warn again next time
        return
    if not handler.told_flood:
        handler.told_flood = True
        handler.reply("*** You are sending lines too fast: they will go out more "
                      "slowly. Nothing is lost.")
        handler.room.tell_console("Slowing down %s: flooding" % handler.client,
                                  host=handler.client.host)
    # Sleeping here holds back only this client: the rest of its lines
    # wait, in order, in its socket. The wait ends early if it is dropped.
    handler.client.sleep(delay)


def more_messages(handler):
    """Take from handler.received the plain messages that may go out at once
    (each within the flood limit: it spends their tokens), as student texts.

    Sending them with the one before costs each recipient one queued item
    and one send, instead of one of each per line: that is what keeps a
    busy room cheap.
    """
    texts, size = [], 0
    while handler.received:
        line = handler.received[0]
        if line is TOO_LONG or line is TELNET_CTRL_C or not is_plain_message(line):
            break
        # At most what one Redis event may carry (a browser's message may
        # hold thousands of lines): the rest goes in the next batch. (A
        # character takes at most 4 bytes.)
        size += len(line)
        if len(texts) + 1 >= REDIS_MAX_EVENT_TEXTS or size > REDIS_TEXT_BYTES // 4:
            break
        if not handler.flood.take_if_free():
            break  # this one must wait: pace_flood() will pace it
        if not says_nothing(line):
            texts.append(student_text(line.rstrip()))
        handler.received.popleft()
    return texts


class Addresses:
    """What the room knows about each computer (address): its connections,
    joins, wrong passwords, ban and mute.

    One student cannot take the room from one computer: connections past
    --per-address are refused, joins and wrong passwords are paced. With
    --per-address 0 (a lab where everyone shares one machine) those limits
    are off; bans and mutes still apply, but the room makes them finer when
    several students share an address (see TeacherConsole.do_kick(), do_mute()).
    Its own lock guards it. It calls nothing outside but the function that
    is_muted() is given, so it may be used while the room's lock is held.
    """

    def __init__(self, settings, clock=time.monotonic):
        self.per_address = settings.per_address
        self.clock = clock
        self._lock = threading.Lock()  # guards every field below
        self._open_from = collections.Counter()  # host -> its connections open now
        self._joins = {}  # host -> FloodLimiter of joins
        self._downloads = {}  # host -> FloodLimiter of downloads of this file
        self._whispers = {}  # host -> FloodLimiter of private messages, all connections'
        self._whisper_pace = (settings.flood_rate, settings.flood_burst)
        self._whispers_slowed = set()  # hosts whose private messages wait now
        self._failures = {}  # host -> [wrong passwords, when it may try again, the last]
        self._bans = {}  # host -> [time.monotonic() when it ends, name kicked]
        self._mutes = {}  # (host, key or None for everyone there) -> name muted
        self._sharers = {}  # the same -> keys of the others joined from host then
        self._dropped = {}  # host -> the name dropped there as too slow, oldest first
        self._pages = {}  # host -> time.monotonic() it was last sent the chat page
        self._lines = {}  # host -> FloodLimiter of its lines, all connections' together
        times = max(2.0, settings.per_address * COMPUTER_LINES_PER_CONNECTION)
        self._line_pace = (settings.flood_rate * times, settings.flood_burst * times)
        self._lines_slowed = set()  # hosts whose lines wait now
        self._texts = {}  # host -> FloodLimiter in bytes: its share of --room-rate
        self._text_rate = settings.room_rate / COMPUTER_SHARE_OF_ROOM \
            if settings.flood_rate > 0 else 0
        self._text_burst = settings.sendq // 2 // COMPUTER_SHARE_OF_ROOM
        self._next_sweep = clock() + ADDRESSES_SWEEP_SECONDS

    def connect(self, host):
        """Count a new connection from host; False if host has too many."""
        with self._lock:
            if self.clock() >= self._next_sweep:
                self._forget_the_past()
            if self.per_address and self._open_from[host] >= self.per_address:
                return False
            self._open_from[host] += 1
            return True

    def _forget_the_past(self):
        """Forget what no longer limits anyone (lock held): over a long day, a
        lab's every address would otherwise be remembered for good.

        A join bucket that is full again is as good as a new one; a ban is
        over when served; wrong passwords count until a day after the last one
        (PASSWORD_FAILURES_KEPT_SECONDS), not for good.
        """
        now = self.clock()
        self._next_sweep = now + ADDRESSES_SWEEP_SECONDS
        for buckets in (self._joins, self._downloads, self._whispers, self._lines):
            for host, bucket in list(buckets.items()):
                if bucket.is_full():
                    del buckets[host]
        self._whispers_slowed &= set(self._whispers)
        self._lines_slowed &= set(self._lines)
        for host, (_, until, last) in list(self._failures.items()):
            if now - max(until, last) > PASSWORD_FAILURES_KEPT_SECONDS:
                del self._failures[host]
        for host, (end, _) in list(self._bans.items()):
            if end <= now:
                del self._bans[host]
        for host, sent in list(self._pages.items()):
            if now - sent > SPARE_CONNECTION_SECONDS:
                del self._pages[host]
        for host, texts in list(self._texts.items()):
            if texts.is_full():
                del self._texts[host]

    def disconnect(self, host):
        """One connection from host has closed (see connect())."""
        with self._lock:
            self._open_from[host] -= 1
            if self._open_from[host] <= 0:
                del self._open_from[host]

    def text_delay(self, host, size):
        """Take size bytes of student text from host; return how long it must wait.

        Its share of the room's budget (see ChatServer._wait_for_room_budget()):
        none with --per-address 0, where the whole class may be one address.
        """
        if not self.per_address or self._text_rate <= 0:
            return 0.0
        with self._lock:
            texts = self._texts.get(host)
            if texts is None:
                texts = self._texts[host] = FloodLimiter(self._text_rate, self._text_burst)
            return texts.delay_for(size)

    def lines_delay(self, host, count):
        """Take count lines that host says to the room: (how long they must wait,
        True if that is the first wait since host's lines went at once).

        Its connections share one pace (see COMPUTER_LINES_PER_CONNECTION):
        else eight connections, each at the flood limit, could bury the room.
        None with --per-address 0 or --flood-rate 0.
        """
        return self._take_shared_pace(self._lines, self._lines_slowed, self._line_pace,
                                      host, count)

    def whisper_delay(self, host):
        """Take one private message from host: (how long it must wait, True if
        that is the first wait since host's messages went at once).

        All its connections share one pace, the flood limit's: else eight
        connections could bury one classmate under forty lines a second,
        unseen by the teacher. None with --per-address 0 or --flood-rate 0.
        """
        return self._take_shared_pace(self._whispers, self._whispers_slowed,
                                      self._whisper_pace, host, 1)

    def _take_shared_pace(self, buckets, slowed, pace, host, count):
        """Take count from host's bucket in buckets, one pace (rate, burst) for
        all its connections: (how long to wait, True if that is the first wait
        since host's went at once, as slowed, a set of hosts, remembers)."""
        rate, burst = pace
        if not self.per_address or rate <= 0:
            return 0.0, False
        with self._lock:
            bucket = buckets.get(host)
            if bucket is None:
                bucket = buckets[host] = FloodLimiter(rate, burst, self.clock)
            delay = bucket.delay_for(count)
            first = delay > 0 and host not in slowed
            (slowed.add if delay > 0 else slowed.discard)(host)
            return delay, first

    def page_sent(self, host):
        """Note that host was sent the chat page (see may_be_spare())."""
        with self._lock:
            self._pages[host] = self.clock()

    def may_be_spare(self, host):
        """True if a new connection from host may be a browser's spare one.

        A browser that loads the page opens a spare connection or two, and
        may send its next request (a reload, a second tab) on one many
        seconds later. Greeted by then, that one could no longer be answered
        in HTTP, and the page would fail to load. So a connection that comes
        just after its computer got the page is greeted only once it sends
        something (see greet()).
        """
        window = SPARE_CONNECTION_SECONDS if self.per_address else SHARED_SPARE_SECONDS
        with self._lock:
            sent = self._pages.get(host)
        return sent is not None and self.clock() - sent < window

    def join_delay(self, host):
        """Take one join from host; return how many seconds it must wait first."""
        if not self.per_address:
            return 0.0
        with self._lock:
            joins = self._joins.get(host)
            if joins is None:
                allowed = JOINS_PER_MINUTE * self.per_address
                joins = self._joins[host] = FloodLimiter(allowed / 60, allowed, self.clock)
            return joins.delay_for()

    def may_download(self, host):
        """Take one download of chat_server.py from host; False if it had its share."""
        if not self.per_address:
            return True
        with self._lock:
            downloads = self._downloads.get(host)
            if downloads is None:
                allowed = DOWNLOADS_PER_MINUTE * self.per_address
                downloads = self._downloads[host] = FloodLimiter(allowed / 60, allowed,
                                                                 self.clock)
            return downloads.take_if_free()

    def password_wait(self, host):
        """Seconds before host may try a password again (0: it may now)."""
        with self._lock:
            failures = self._failures.get(host)
            return max(0.0, failures[1] - self.clock()) if failures else 0.0

    def password_failed(self, host):
        """Count a wrong password; past the free ones, the wait doubles each time."""
        if not self.per_address:
            return
        with self._lock:
            failures = self._failures.setdefault(host, [0, 0.0, 0.0])
            failures[0] += 1
            failures[2] = self.clock()
            beyond = failures[0] - PASSWORD_FAILURES_FREE * self.per_address
            if beyond > 0:
                wait = min(PASSWORD_WAIT_MAX_SECONDS, PASSWORD_WAIT_SECONDS * 2 ** (beyond - 1))
                failures[1] = self.clock() + wait

    def password_passed(self, host):
        with self._lock:
            self._failures.pop(host, None)

    def note_dropped(self, host, name):
        """Remember that name at host was dropped as too slow, to tell them later."""
        with self._lock:
            if len(self._dropped) >= DROPPED_REMEMBERED:
                self._dropped.pop(next(iter(self._dropped)))  # the oldest
            self._dropped[host] = name

    def take_dropped(self, host):
        """The name someone at host was dropped as too slow under, once; or None."""
        with self._lock:
            return self._dropped.pop(host, None)

    def ban(self, host, name, minutes):
        with self._lock:
            self._bans[host] = [self.clock() + 60 * minutes, name]

    def ban_left(self, host):
        """Seconds left of host's ban (0: not banned)."""
        with self._lock:
            ban = self._bans.get(host)
            if ban and ban[0] <= self.clock():
                del self._bans[host]  # served
                ban = None
            return ban[0] - self.clock() if ban else 0.0

    def unban(self, host_or_name):
        """Lift the ban on an address, or on the address a name was kicked from.

        Return the address, or None if nothing was banned by that.
        """
        key = fold_name(host_or_name)
        with self._lock:
            for host, (_, name) in list(self._bans.items()):
                if host == normal_host(host_or_name) or fold_name(name) == key:
                    del self._bans[host]
                    return host
        return None

    def banned(self):
        """The banned addresses, each with the name kicked from it."""
        now = self.clock()
        with self._lock:
            return sorted("%s (%s)" % (host, name) for host, (end, name) in self._bans.items()
                          if end > now)

    def mute(self, host, key, name, others=()):
        """Mute a name at host (key), or everyone at host (key None).

        others: for a name, the keys of the others joined from host then.
        """
        with self._lock:
            self._mutes[(host, key)] = name
            self._sharers[(host, key)] = frozenset(others)

    def unmute(self, name, host=None, key=None):
        """Forget the mutes of that name (and of host, if given); return their hosts."""
        folded = fold_name(name)
        with self._lock:
            found = [mute for mute, muted_name in self._mutes.items()
                     if fold_name(muted_name) == folded or mute in ((host, key), (host, None))]
            for mute in found:
                del self._mutes[mute], self._sharers[mute]
            # Someone caught by another name's mute there (see is_muted())
            # is let go for good: else they would be muted again at their
            # next join.
            for (muted_host, muted_key), others in self._sharers.items():
                if muted_host == host and muted_key is not None and key is not None:
                    self._sharers[(muted_host, muted_key)] = others | {key}
        return {mute_host for mute_host, _ in found}

    def is_muted(self, host, key, keys_online_from=None):
        """True if the teacher muted this name at host, or everyone at host.

        keys_online_from(host): the keys joined from there now, if the
        newcomer is to be looked at as a whole: a name muted where others
        shared the address, gone now, is taken to be back as any name that
        none of those others had (else a student with a second name online
        would shake off every mute by rejoining under a third).
        """
        with self._lock:
            if (host, None) in self._mutes or (host, key) in self._mutes:
                return True
            gone = [(muted_key, others) for (muted_host, muted_key), others
                    in self._sharers.items() if muted_host == host and key not in others]
            if not gone or keys_online_from is None or not self.per_address:
                return False  # (with --per-address 0 one address is the whole class)
            online = keys_online_from(host)
            return any(muted_key not in online for muted_key, _ in gone)


def normal_host(host):
    """One spelling of a client's IP address, for limits, bans and mutes.

    An IPv4-mapped IPv6 address (::ffff:10.0.0.5) is its IPv4 address, and
    ::1 is 127.0.0.1, so that nobody escapes a ban by changing spelling.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an address (a name typed at the console): as it is
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.is_loopback:
            return "127.0.0.1"
    return str(address)


# --- Before joining: the greeting, the password, the name --------------------
# ChatHandler.handle() calls greet(), check_password() and ask_name(), which
# joins the client to the room (ChatRoom.join()); it calls wait_to_join()
# once, before the first try to join.


def greet(handler):
    """Answer a web browser in HTTP; welcome anyone else. False: hang up."""
    # A browser sends its request as soon as it connects; a person takes
    # longer than BROWSER_WAIT_SECONDS to type. Waiting that long before
    # the first prompt lets a browser get a real HTTP answer. A browser's
    # spare connection waits for its request until the name timeout: one
    # still silent then, from a computer that just got the page. (Asked
    # after the wait: a browser opens its spares as it asks for the page.)
    data = handler.wait_for_bytes(BROWSER_WAIT_SECONDS)
    spare = data is None and handler.room.addresses.may_be_spare(handler.client.host)
    if spare:
        timeout = handler.room.settings.name_timeout
        data = handler.wait_for_bytes(timeout - BROWSER_WAIT_SECONDS if timeout else None)
    if data == b"" or (spare and data is None):
        return False  # gone, or a spare the browser never used: no goodbye
    if data and looks_like_http(data):
        if not answer_http(handler, data):  # see "The browser page" below
            return False
    elif data and REDIS_COMMAND.match(data):  # --redis given this port by mistake
        handler.client.send_bytes(b"-ERR " + NOT_REDIS.encode("ascii") + b"\r\n")
        return False
    elif data:
        handler.take_bytes(data)  # telnet's options are answered
        if spare:
            # Someone who started nc just after this computer loaded the
            # page saw nothing, and pressed Enter: not their name yet.
            handler.received.clear()
    handler.reply("*** Welcome to the chat!")
    timeout = handler.room.settings.name_timeout
    if timeout > 0:
        handler.reply("*** You have %s to give %syour name." % (
            describe_minutes(timeout / 60),
            "the password and " if handler.room.settings.password else ""))
    dropped_as = handler.room.addresses.take_dropped(handler.client.host)
    if dropped_as:
        handler.reply("*** Last time (as %s) you were disconnected: your computer did "
                      "not read the chat fast enough." % dropped_as)
    return True


PASSWORD_QUESTION = "*** This room has a password. Password?"  # the page knows it too
# What a Redis client sends first (an array of bulk strings), and our answer.
REDIS_COMMAND = re.compile(rb"\*[0-9]+\r\n\$")
NOT_REDIS = "this is a chat server, not Redis"


def check_password(handler, deadline):
    """Ask for the room password if there is one; False: wrong, or gone."""
    password = handler.room.settings.password
    if not password:
        return True
    addresses = handler.room.addresses
    wait = addresses.password_wait(handler.client.host)
    if wait > 0:
        handler.reply("*** Too many wrong passwords from your computer. Try again in "
                      "%s." % describe_minutes(wait / 60))
        return False
    handler.waiting_for = "the password"
    answer = ""
    while answer is not TOO_LONG and not answer.strip():  # Enter alone: asked again
        handler.reply(PASSWORD_QUESTION)
        answer = handler.read_line(deadline)
        if answer is None:
            return False
    right = answer is not TOO_LONG and hmac.compare_digest(
        answer.strip().encode("utf-8"), password.encode("utf-8"))
    # Right or wrong, the answer comes after the same delay: a guesser
    # cannot hang up early on a wrong guess and try the next one sooner.
    handler.client.sleep(PASSWORD_ANSWER_SECONDS)  # ends early at shutdown
    if right:
        addresses.password_passed(handler.client.host)
        return True
    handler.room.tell_console("Wrong password from %s" % handler.client, warning=True)
    addresses.password_failed(handler.client.host)
    handler.reply("*** Wrong password. Goodbye.")
    return False


def ask_name(handler, deadline):
    """Ask for a name until one is free and valid, then join. False: gone."""
    question = "What is your name?"
    handler.waiting_for = "a name"
    handler.reply("*** " + question)
    waited = False  # once per connection, at its first name (wait_to_join())
    while True:
        line = handler.read_line(deadline)
        if line is None:
            return False
        pace_flood(handler, blank=line is not TOO_LONG and says_nothing(line))
        if line is TOO_LONG:
            problem = "That name is too long: at most %d characters." % MAX_NAME_CHARS
        elif not line.strip():
            problem = ""
        else:
            if not waited:
                wait_to_join(handler)
                waited = True
            problem = handler.room.join(handler.client, line.strip())
            if problem is None:
                return True
            if problem is SHUTTING_DOWN:
                return False  # close_room() said goodbye to every connection
            if problem is REMOVED:
                handler.reply("*** %s Goodbye." % problem)
                return False
        handler.reply("*** %s%s" % (problem + " " if problem else "", question))


def wait_to_join(handler):
    """Wait if many joined from this computer just now (join/leave spam)."""
    delay = handler.room.addresses.join_delay(handler.client.host)
    if delay > 0:
        handler.reply("*** Many people joined from your computer just now: you join "
                      "in %s." % describe_minutes(delay / 60))
        handler.client.sleep(delay)


# --- Peers that vanish: TCP keepalive ----------------------------------------
# ChatHandler.setup() asks the OS to probe each connection, so a laptop that
# went to sleep does not hold its name (and its outbox) for hours.


def enable_keepalive(sock):
    """Ask the OS to notice a peer that vanished (laptop asleep, Wi-Fi gone).

    Probes start after KEEPALIVE_IDLE_SECONDS of silence, so a dead peer is
    found within about two minutes, where the platform lets us set that.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    tunings = [
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),  # Linux, Windows 10+
        ("TCP_KEEPALIVE", KEEPALIVE_IDLE_SECONDS),  # macOS's name for it
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        # Also give up on a peer that stops acknowledging what we send.
        ("TCP_USER_TIMEOUT", int(1000 * UNACKED_SECONDS)),
    ]
    for option_name, value in tunings:
        option = getattr(socket, option_name, None)
        if option is None:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass  # an older kernel: the OS default (about two hours) applies


# --- Refusals: saying why, without a thread for each --------------------------
# ChatServer.process_request() hands each connection it will not admit to
# the Refuser, which tells it why from one thread of its own.


class Refuser:
    """Tells refused connections why, from one thread, spending no thread on each.

    Each refused socket gets up to BROWSER_WAIT_SECONDS to send a first
    request (so a browser is answered in HTTP), then its answer; then it is
    half-closed and read until it closes or REFUSAL_DRAIN_SECONDS pass.
    Closing a socket with unread input resets it, and a reset can overtake
    our line: the student would see nothing at all. At most REFUSALS_AT_ONCE
    are held so; in a flood, the next are told and closed at once, so that
    a student opening refused connections fast cannot use up the open files.
    """

    def __init__(self):
        self._arrivals = queue.SimpleQueue()  # (socket, reason) to take on
        self._thread = None
        self._thread_lock = threading.Lock()  # guards _thread
        self._process_ending = threading.Event()  # answer all now
        self._all_answered = threading.Event()  # ...and they have been

    def refuse(self, sock, reason):
        """Take over sock (it will be closed): tell it reason."""
        if self._arrivals.qsize() >= REFUSALS_AT_ONCE:  # a flood: no waiting
            send_and_close(sock, encode_line("*** " + reason))
            return
        self._arrivals.put((sock, reason))
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="refuser",
                                                daemon=True)
                self._thread.start()

    def answer_all_now(self, seconds):
        """Answer every connection held, at once (in HTTP if its request came
        already); wait up to seconds for it. The server is about to exit."""
        with self._thread_lock:
            if self._thread is None:
                return  # never refused anyone
        self._all_answered.clear()
        self._process_ending.set()
        self._arrivals.put(None)  # wakes the thread
        self._all_answered.wait(seconds)

    def _run(self):
        # Each pending socket: [reason, bytes it sent, time of the next step,
        # answered yet]. The selector is only touched by this thread.
        pending = {}
        with selectors.DefaultSelector() as readable:
            while True:
                self._take_arrivals(pending, readable, block=not pending)
                if self._process_ending.is_set():
                    for sock, state in list(pending.items()):
                        if not state[3]:
                            self._read(sock, pending, readable)  # a request waiting unread
                        if sock in pending and not pending[sock][3]:
                            self._next_step(sock, pending, readable)
                    if self._arrivals.empty():
                        self._all_answered.set()
                if not pending:
                    continue  # the one that came was closed already
                timeout = min(step for _, _, step, _ in pending.values()) - time.monotonic()
                for key, _ in readable.select(max(0.0, min(timeout, 0.05))):
                    self._read(key.fileobj, pending, readable)
                now = time.monotonic()
                for sock, state in list(pending.items()):
                    if state[2] <= now:
                        self._next_step(sock, pending, readable)

    def _take_arrivals(self, pending, readable, block):
        while True:
            try:
                arrival = self._arrivals.get(block=block)
            except queue.Empty:
                return
            block = False
            if arrival is None:
                continue  # answer_all_now() woke us
            sock, reason = arrival
            if len(pending) >= REFUSALS_AT_ONCE:  # a flood: hold no more sockets
                send_and_close(sock, encode_line("*** " + reason))
                continue
            try:
                sock.setblocking(False)
                readable.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                sock.close()
                continue
            pending[sock] = [reason, b"", time.monotonic() + BROWSER_WAIT_SECONDS, False]
            if len(pending) >= REFUSALS_AT_ONCE:
                self._next_step(sock, pending, readable)  # no waiting for a browser

    def _read(self, sock, pending, readable):
        state = pending[sock]
        try:
            data = sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget(sock, pending, readable)
        elif not state[3]:
            state[1] = (state[1] + data)[:RECV_BYTES]
            if b"\n\n" in state[1].replace(b"\r", b"") or not looks_like_http(state[1]):
                self._next_step(sock, pending, readable)  # the request is complete

    def _next_step(self, sock, pending, readable):
        """Answer a socket that has waited enough; close one that has drained."""
        state = pending[sock]
        if state[3]:
            self._forget(sock, pending, readable)
            return
        state[2], state[3] = time.monotonic() + REFUSAL_DRAIN_SECONDS, True
        try:
            sock.send(refusal_answer(state[1], state[0]))
            sock.shutdown(socket.SHUT_WR)  # our side is done: the client sees EOF
        except OSError:
            self._forget(sock, pending, readable)

    @staticmethod
    def _forget(sock, pending, readable):
        del pending[sock]
        readable.unregister(sock)
        sock.close()


def send_and_close(sock, data):
    """Send what fits without waiting, then close (the accept loop must not wait).

    What the client sent already is read first: closing with unread input
    would reset the connection, and the reset can overtake our line.
    """
    try:
        sock.setblocking(False)
        sock.send(data)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(REFUSAL_DRAIN_READS):  # bounded: the accept loop must go on
            if not sock.recv(RECV_BYTES):
                break
    except OSError:
        pass  # nothing more to read now (BlockingIOError), or the client is gone
    sock.close()


# --- Words for waits, counts and addresses ------------------------------------
# Small helpers used all over the file (Client's name for the console too).
# Room events are worded by event_lines(), in the core.


def describe_minutes(minutes):
    """A wait as a person says it: '40 seconds', '1 minute', '5 minutes'."""
    if minutes < 1:
        return plural(max(1, round(minutes * 60)), "second")
    return plural(int(minutes + 0.999), "minute")


def list_names(names, shown=3):
    """'ada', 'ada and bob', 'ada, bob and cy', 'ada, bob, cy and 2 more'."""
    if len(names) > shown:
        names = names[:shown] + ["%d more" % (len(names) - shown)]
    if len(names) < 2:
        return "".join(names)
    return "%s and %s" % (", ".join(names[:-1]), names[-1])


def plural(count, word):
    """'1 minute', '2 minutes': no 'minute(s)' anywhere."""
    return "%d %s%s" % (count, word, "" if count == 1 else "s")


def typed_address(text):
    """The address (normal_host()) the teacher typed, or None: 10.0.0.5, ::1,
    or as /who shows a connection, with its port: 10.0.0.5:51234, [::1]:51234."""
    text = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::\d+)?|([\d.]+):\d+", text)
    if match:
        text = match.group(1) or match.group(2)
    try:
        return normal_host(str(ipaddress.ip_address(text)))
    except ValueError:
        return None


def format_address(address):
    """host:port, with brackets around an IPv6 host."""
    host, port = address[:2]
    return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)


# --- The whole room: ChatServer -----------------------------------------------
# Adds to the core room (ChatRoom) what a class needs around it: admitting
# or refusing connections, whispers and renames, the room-wide budget, the
# console's record of the room, the room operations the teacher's console
# calls (the rules of /kick, /ban and /mute live in TeacherConsole), and the
# shutdown.

TOO_MANY_FROM_ONE = "Too many connections from your computer (%d). Close one, then try again."


class ChatServer(ChatRoom):
    """The room the program runs: ChatRoom, and all that surrounds it."""

    def __init__(self, address, settings=None, transcript=None):
        settings = settings or Settings()
        # Made before ChatRoom binds the port: if binding fails, socketserver
        # calls server_close(), which needs them.
        self._connected = set()  # every Client with a reader thread, joined or not
        self._places_taken = 0  # connections admitted, with a thread or about to be
        self._closing_began = False  # close_room() has begun: it runs once
        self._closing_ended = threading.Event()  # ...and close_room() has ended
        # Not guarded by the room's lock: each of these has a lock of its own
        # (and none of them ever waits for the room's lock: no deadlock).
        self.addresses = Addresses(settings)
        # --flood-rate 0 turns all pacing off, the room's budget too. The burst
        # is half an outbox, so a burst never fills a reader's outbox by itself.
        self._room_budget = ByteBudget(
            settings.room_rate if settings.flood_rate > 0 else 0, settings.sendq // 2)
        self._refuser = Refuser()
        self._hinted_per_address = False  # see process_request() (its thread only)
        # Room events for the console and the transcript (see Recorder).
        self.recorder = Recorder(settings, transcript)
        super().__init__(address, settings)  # the room's core: it binds the port
        self._everyone_gone = threading.Condition(self._lock)  # for close_room()
        if self.settings.redis is not None:  # Redis link: linked before serving
            self._link = RedisLink(self, self.settings.redis)
            try:
                self._link.connect()
            except RedisStartError:
                self.server_close()
                raise
        self.recorder.start()
        self.notices.start()
        if self._link is not None:
            self._link.start()

    # -- The other room events --

    def whisper(self, client, name, text):
        """Send a private message to the client called name; return a problem or None."""
        # Its bytes count toward the room's budget; its pace is whisper_delay()'s.
        self._wait_for_room_budget(client, [text, client.name], room_lines=False)
        with self._lock:
            if self._joined.get(client.key) is not client:
                return None  # kicked, or dropped, while this line was held back
            target = self._joined.get(fold_name(name))
            remote = self._remote.get(fold_name(name))  # Redis link: on another server?
            if target is None and remote is None:
                if self._link is not None and self._link.out_of_reach(fold_name(name)):
                    return ("%s is on another server, out of reach for now: try again "
                            "once the room is whole." % name)
                return "No one called %s is online. Type /who to see who is." % name
            if target is client:
                return "That is you: /msg is for someone else."
            silenced = self._why_silenced(client)
            self.notices.catch_up(client)
            if silenced is not None:
                client.queue_line(silenced)
                recipients = [client]
            else:
                to = target if target is not None else remote
                lines = [(client, "*** You whispered to %s: %s" % (to.name, text))]
                if target is None:  # Redis link: over the other server's channel
                    self._link.publish_private(remote, {"k": "whisper", "name": client.name,
                                                     "to": remote.name, "text": text})
                else:
                    lines.insert(0, (target, "%s whispers: %s" % (client.name, text)))
                self.recorder.note("private", "%s whispers to %s: %s" % (
                    client.name, to.name, text))
                recipients = self._queue_private(lines)
        self._send_queued(recipients)
        return None

    def _queue_private(self, lines, *hold):
        """Queue [(client, line)] now; return the clients (lock held).

        Redis link: a chat line of the sender's that is still on its way
        through Redis is shown first (hold: see RedisLink.hold_private()).
        """
        if self._link is not None and self._link.hold_private(lines, *hold):
            return []
        for client, line in lines:
            self._queue_for(client, line)
        return [client for client, _ in lines]

    def rename(self, client, new_name):
        """Rename client and tell everyone; return why not, or None."""
        new_name = unicodedata.normalize("NFC", new_name)  # checked as it will be shown
        problem = name_problem(new_name)
        if problem:
            return problem
        if new_name == client.name:
            return "You are already called %s." % new_name
        key, looks = fold_name(new_name), looks_of(new_name)
        with self._lock:  # before claiming it in Redis: a look-alike is refused here
            problem = self._rename_problem(key, looks, client)
        if problem:
            return problem
        if client.renames.full():  # checked before the claim too: a refused
            return self._renames_used_up(client)  # rename must not hold the name
        if self._link is not None and key != client.key:
            problem = self._link.claim_name(new_name, key, client.key)  # Redis link
            if problem:
                return problem
        with self._lock:
            problem = self._rename_problem(key, looks, client)
            if problem:
                return problem
            if not client.renames.allow():
                return self._renames_used_up(client)
            old_name = client.name
            self._remove_client(client)
            client.name, client.key, client.looks = new_name, key, looks
            self._add_client(client)
            event = {"k": "rename", "old": old_name, "new": new_name}
            recipients = self._broadcast(event_lines(event), event=event, notice=True)
            # A mute follows the name: a classmate at that computer (or anyone,
            # with --redis) who takes a muted name takes its mute too.
            if self.addresses.is_muted(client.host, key) or (
                    self._link is not None and key in self._link.muted_keys):  # Redis link
                client.muted = True
                self._queue_for(client, MUTED_LINE)
                recipients.append(client)
                self.recorder.note("console", "%s is now %s, a muted name: muted too "
                                   "(/unmute %s lifts it)." % (old_name, new_name, new_name))
        self._send_queued(recipients)
        return None

    def _renames_used_up(self, client):
        return "You can change your name at most %s a minute." % (
            plural(client.renames.limit, "time"))

    def _rename_problem(self, key, looks, client):
        """Why client may not take a new name now (lock held), or None."""
        if self._joined.get(client.key) is not client:
            return "You are not in the room."  # kicked, or dropped, while it was held back
        if client.muted or self._quiet:
            return "You cannot change your name while %s." % (
                "the teacher has muted you" if client.muted else "the room is quiet")
        return self._name_taken(key, looks, client)

    def who(self):
        """The line that lists who is online, in alphabetical order."""
        with self._lock:
            return self._online_line()

    def tell_who(self, client):
        """Send client the list of who is online, in the room's order: made when
        queued, a list could name someone whose leave line it follows."""
        with self._lock:
            self._queue_for(client, self._online_line())
        self._send_queued([client])

    def _wait_for_room_budget(self, client, lines, room_lines=True):
        """Hold a sender back while its computer says too many lines, or the
        room takes in more than --room-rate bytes a second.

        Each reader gets everything everyone says, so without a room-wide
        budget a hundred senders, each within their own flood limit, could
        fill a slow reader's outbox in a second and get them dropped.
        """
        if client.muted or self._quiet:
            # muted and _quiet are read without the lock, as a hint only: what
            # is silenced reaches nobody, so it costs the room nothing.
            return
        # This computer's share first (its lines, then its bytes), and the
        # room's only after it: one that sends more than its share waits on
        # its own, and leaves the room's budget to everyone else. Each wait
        # ends early if the sender is dropped.
        delay, first = self.addresses.lines_delay(client.host, len(lines)) \
            if room_lines else (0.0, False)
        if first:
            self.tell_console("Slowing down %s: too many lines from its connections "
                              "together (%s was the first)" % (client.host, client.name),
                              host=client.host)
            with self._lock:
                self._queue_for(client, "*** Your computer is sending lines too fast: "
                                "they will go out more slowly. Nothing is lost.")
            self._send_queued([client])
        if delay > 0:
            client.sleep(delay)
        if not self._room_budget.active:
            return
        size = sum(len(line.encode("utf-8")) + 2 for line in lines)
        delay = self.addresses.text_delay(client.host, size)
        if delay > 0:
            client.sleep(delay)
        delay = self._room_budget.delay_for(size)
        if delay > 0:
            client.sleep(delay)

    def _why_silenced(self, client):
        """None if client may speak now; else what to tell it (lock held)."""
        if client.muted:
            return "*** Not sent: the teacher has muted you."
        if self._quiet:
            return "*** Not sent: the room is quiet, only the teacher can speak right now."
        return None

    # -- Admitting connections (socketserver's main thread) --

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            # "--host ::" serves IPv4 clients too, where the OS allows it.
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: keep our port ours
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        super().server_bind()

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                log.warning("Too many open files: a newcomer waits. (%s)", error)
                # The listening socket stays ready, so without a rest the
                # accept loop would spin at full speed until a file is freed.
                time.sleep(ACCEPT_BACKOFF_SECONDS)
            raise  # socketserver drops this attempt and goes on serving

    def process_request(self, request, client_address):
        """Admit a newcomer (start its thread), or refuse it before any thread."""
        host = normal_host(client_address[0])
        with self._lock:
            refusal = self._refusal_for(host)
            if refusal is None:
                self._places_taken += 1
        if refusal is not None:
            self.tell_console("Refused %s: %s" % (format_address(client_address), refusal),
                              host=host)
            if refusal == TOO_MANY_FROM_ONE % self.settings.per_address and \
                    not self._hinted_per_address:  # a lab behind one address? Once:
                self._hinted_per_address = True
                self.tell_console("If several students share that address (one shared "
                                  "machine, a school proxy), restart the server with "
                                  "--per-address 0, or a number as big as the class.",
                                  warning=True)
            self._refuser.refuse(request, refusal)  # it closes the socket
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except RuntimeError:  # no thread could be started: give the place back
            self._free_place(host)
            raise

    def _refusal_for(self, host):
        """Say why a new connection from host may not come in, or count it (lock held)."""
        if self._said_goodbye:
            return SHUTTING_DOWN
        ban_left = self.addresses.ban_left(host)
        if ban_left > 0:
            return "You were removed by the teacher. Try again in %s." % (
                describe_minutes(ban_left / 60))
        if self._places_taken >= self.settings.max_clients:
            return "The room is full (%d connected). Try again later." % self._places_taken
        if not self.addresses.connect(host):
            return TOO_MANY_FROM_ONE % self.settings.per_address
        return None

    def _free_place(self, host):
        with self._lock:
            self._places_taken -= 1
            self._everyone_gone.notify_all()
        self.addresses.disconnect(host)

    def finish_request(self, request, client_address):
        """Run one connection's handler, its whole life in its thread; then
        free its place, however it ended."""
        try:
            super().finish_request(request, client_address)
        except OSError as error:
            # Reset before setup() was done (macOS then refuses socket
            # options, EINVAL): nothing to say, but its place is given back.
            log.debug("%s was gone before its setup: %r", format_address(client_address), error)
        finally:
            self._free_place(normal_host(client_address[0]))

    def handle_error(self, request, client_address):
        # One line, not socketserver's traceback on the teacher's console.
        error = sys.exc_info()[1]
        log.error("Error with %s: %r", format_address(client_address), error)

    # -- Connections (each client's reader thread) --

    def register(self, client):
        """Count a connection as open (its thread has started)."""
        with self._lock:
            self._connected.add(client)
            # Admitted just before close_room() began, and not among those it
            # said goodbye to: its goodbye is said here.
            too_late = self._said_goodbye
            if too_late:
                client.queue_line("*** " + SHUTTING_DOWN)
        if too_late:
            client.close_when_sent()  # its reader then sees the end, and finishes

    def unregister(self, client):
        """Forget a finished connection (finish_request() then frees its place)."""
        with self._lock:
            self._connected.discard(client)

    def places_taken(self):
        """How many connections are open (admitted, not yet finished), joined or not."""
        with self._lock:
            return self._places_taken

    # -- The console: what it is told, and the few room operations it calls --

    def tell_console(self, text, warning=False, host=None):
        """Show text on the console after the room events already queued.

        Everything the console says about the room comes this way, so it
        comes in the room's order ("left the chat." before "Closed"; with
        --redis, a leave line is shown when it comes back from Redis, which
        may be after its "Closed").
        host: the computer whose connection the line is about; past
        CONNECTION_LINES_SHOWN of them in CONNECTION_LINES_SECONDS, such lines
        are counted, not shown (see ConnectionLines).
        """
        kind = "warning" if warning else "console"
        with self._lock:
            if host is None:
                self.recorder.note(kind, text)
            else:
                self.recorder.note("connection", (host, kind, text))

    def note_teacher(self, text, elsewhere=False):
        """Write what the teacher did to the transcript, in the room's order.

        elsewhere: a teacher at another linked server's console (Redis link).
        """
        with self._lock:
            self.recorder.note("transcript", "[teacher%s] %s" % (
                " at another server" if elsewhere else "", text))

    def announce(self, text):
        """Send the teacher's announcement to everyone."""
        with self._lock:
            event = {"k": "announce", "text": text}
            recipients = self._broadcast(event_lines(event), event=event)
        self._send_queued(recipients)

    def find(self, name):
        """The joined client called name (or a look-alike of it), or None.

        With the Redis link, a student called exactly name on another server
        comes before a look-alike here: then None (ask_other_server() finds it).
        """
        key = fold_name(name)
        with self._lock:
            client = self._joined.get(key)
            if client is not None or key in self._remote:
                return client
            for look in looks_of(name):
                client = self._joined.get(self._looks.get(look))
                if client is not None:
                    return client
            return None

    def _keys_from(self, host):
        """The keys of the clients joined from host (lock held): see is_muted()."""
        return {key for key, client in self._joined.items() if client.host == host}

    def connections_from(self, host):
        """(joined clients, connections not joined yet) from one address."""
        with self._lock:
            everyone = [client for client in self._connected if client.host == host]
        joined = [client for client in everyone if self.has_joined(client)]
        return joined, [client for client in everyone if client not in joined]

    def out_of_reach(self, name):
        """Redis link: what to tell the teacher about a student on a server cut
        off now (see RedisLink.out_of_reach()), or None."""
        with self._lock:
            if self._link is None or not self._link.out_of_reach(fold_name(name)):
                return None
        return ("%s is on another server, out of reach for now (the servers are apart): "
                "try again once the room is whole." % name)

    def ask_other_server(self, name, event, verb):
        """Redis link: pass /kick or /mute on to the server of a student elsewhere.

        Return the reply for the teacher, or None if no such student is there.
        """
        with self._lock:  # the link numbers what it sends under the room's lock
            student = self._remote.get(fold_name(name))
            if student is None or self._link is None:
                return None
            self._link.publish_private(student, dict(event, name=student.name))
            reason = event.get("reason")
            self.recorder.note("transcript", "[teacher] asked the server of %s to %s them%s"
                               % (student.name, verb, ": " + reason if reason else ""))
        return "Asked the server of %s to %s them." % (student.name, verb)

    def unmute_elsewhere(self, name):
        """Redis link: forget a mute of name on every server (it may be offline).

        False without a link.
        """
        name = unicodedata.normalize("NFC", name)  # as the other servers check it
        if self._link is None or name_problem(name):
            return False
        with self._lock:  # the link's mutes are guarded by the room's lock
            self._link.note_muted(fold_name(name), False)
        self._link.unmute_everywhere(name)
        return True

    def has_joined(self, client):
        with self._lock:
            return client.key is not None and self._joined.get(client.key) is client

    def remove_by_teacher(self, client, line):
        """Take client out of the room, tell it line, and close its connection."""
        # Out first: leave() queues the notices it was not given yet, and no
        # later one reaches it, so none can follow the line.
        self.leave(client)
        client.send_line(line)
        client.close_when_sent()

    def set_muted(self, client, muted):
        """Mute or unmute a joined client, and tell it so; False if it already was."""
        with self._lock:
            if client.muted == muted:
                return False
            client.muted = muted
            if self._link is not None:  # Redis link: muted on every server
                self._link.note_muted(client.key, muted)
            self._queue_for(client, MUTED_LINE if muted else
                            "*** The teacher has unmuted you: you can chat again.")
        self._send_queued([client])
        return True

    def set_quiet(self, quiet):
        """Turn quiet mode on or off and tell everyone; False if it already was."""
        with self._lock:
            if self._quiet == quiet:
                return False
            self._quiet = quiet
            event = {"k": "quiet", "on": quiet}
            recipients = self._broadcast(event_lines(event), event=event)
        self._send_queued(recipients)
        return True

    def snapshot(self):
        """(joined clients in name order, connections that have not joined,
        students on other servers: RemoteStudent tuples)."""
        with self._lock:
            joined = [self._joined[key] for key in self._keys_in_order]
            waiting = [client for client in self._connected if client.key is None]
            elsewhere = sorted(self._remote.values())  # Redis link
        return joined, waiting, elsewhere

    # -- Shutting down --

    def stop_serving(self):
        """Close the room, then stop serve_forever(): Ctrl+C, SIGTERM and /shutdown.

        In this order a connection that comes while the room closes is still
        accepted, and told why it cannot come in (see _refusal_for()).
        """
        try:
            self.close_room()
        finally:
            self.shutdown()

    def is_closing(self):
        """True once close_room() has begun.

        Read without the room's lock: a signal handler calls it, in the main
        thread, which may hold that lock at the moment (process_request()).
        """
        return self._closing_began

    def close_room(self):
        """Tell everyone the server is shutting down and close every connection.

        Returns within about two seconds, even if a client has stalled (with
        --redis, telling the other servers may take a few seconds more).
        Called again, it waits for the first call to end.
        """
        with self._lock:
            closing, self._closing_began = self._closing_began, True
        if closing:
            wait_in_slices(self._closing_ended.wait, 2 * SHUTDOWN_GRACE_SECONDS + 60)
            return
        try:
            self._close_room()
        finally:
            self._closing_ended.set()

    def _close_room(self):
        """close_room()'s work, done once."""
        with self._lock:
            log.info("Shutting down: telling everyone and closing connections.")
            # Redis link: what is still on its way through Redis is shown here
            # first; no newcomer sees the room unlinked before the goodbye.
            leaving = self._link.unlink() if self._link is not None else None
            self._said_goodbye = True
            self.recorder.note("transcript", "=== The server is shutting down. ===")
            everyone = list(self._connected)
            shared = {}
            for client in everyone:
                self.notices.catch_up(client, shared)
                client.queue_line("*** " + SHUTTING_DOWN)
        for client in everyone:
            client.close_when_sent()
        if self._link is not None:  # the others see our students leave
            self._link.close(leaving)
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        for client in everyone:
            wait_in_slices(client.wait_closed, max(0.0, deadline - time.monotonic()))
        for client in everyone:
            client.close_now()  # a stalled client's writer is still blocked: wake it
        with self._lock:  # let the readers finish their goodbyes
            wait_in_slices(lambda timeout: self._everyone_gone.wait_for(
                lambda: not self._connected, timeout), SHUTDOWN_GRACE_SECONDS)

    def _refuse_the_backlog(self):
        """Tell the connections the OS accepted, that serve_forever() never took,
        goodbye: closing the listening socket would reset them."""
        # Twice: more come while the Refuser answers the first ones.
        for _ in range(2):
            try:
                self.socket.setblocking(False)
                for _ in range(LISTEN_BACKLOG):
                    sock, _ = self.socket.accept()
                    self._refuser.refuse(sock, SHUTTING_DOWN)
            except OSError:
                pass  # none left (BlockingIOError), or not listening
            # The process ends next: what the Refuser holds is answered now.
            self._refuser.answer_all_now(BROWSER_WAIT_SECONDS)

    def server_close(self):
        if self._link is not None:
            self._link.stop()
        if self._closing_began:
            self._refuse_the_backlog()
        super().server_close()
        self.notices.stop()
        self.recorder.stop()


# =============================================================================
# The extras: the students' commands, the teacher's console and transcript,
# the browser page, the Redis link, the line client, and main().
# =============================================================================

# --- The students' commands --------------------------------------------------
# ChatHandler.handle_line() gives a line that starts with / to run_command(),
# which looks its first word up in STUDENT_COMMANDS. To add a command, write
# a function here that takes the handler and the rest of the line, and add
# it to STUDENT_COMMANDS: /help lists it.


def do_help(handler, argument):
    lines = ["*** Commands:"]
    lines += ["***   " + line for line in describe_commands(STUDENT_COMMANDS)]
    lines.append("***   %-22s %s" % ("//text", "send a line that starts with /"))
    private = ("private messages too" if handler.room.settings.transcript_private
               else "not private messages")
    lines.append("*** The teacher sees the chat on the server's screen (%s)." % private)
    handler.reply(*lines)


def do_nick(handler, argument):
    if not argument:
        handler.reply("*** Usage: /nick NEWNAME")
        return
    problem = handler.room.rename(handler.client, argument)
    if problem:
        handler.reply("*** " + problem)


def do_who(handler, argument):
    handler.room.tell_who(handler.client)


def do_me(handler, argument):
    if says_nothing(argument):
        handler.reply("*** Usage: /me ACTION   (for example: /me waves)")
        return
    handler.room.act(handler.client, argument)


def do_msg(handler, argument):
    name, _, text = argument.partition(" ")
    if not name or says_nothing(text):
        handler.reply("*** Usage: /msg NAME TEXT")
        return
    delay, first = handler.room.addresses.whisper_delay(handler.client.host)
    if first:  # once for the computer, however many connections it has
        handler.room.tell_console("Slowing down private messages from %s: too many from "
                                  "its connections together (%s, to %s, was the first)"
                                  % (handler.client.host, handler.client.name, name),
                                  host=handler.client.host)
    if delay > 0:
        if not handler.told_whispers:
            handler.told_whispers = True
            handler.reply("*** Your computer is sending private messages too fast: they "
                          "will go out more slowly. Nothing is lost.")
        handler.client.sleep(delay)  # this connection's next lines wait, in order
    else:
        handler.told_whispers = False
    problem = handler.room.whisper(handler.client, name, text.strip())
    if problem:
        handler.reply("*** " + problem)


def do_quit(handler, argument):
    # One space between words: spaces to pad it could wrap the server's
    # line in a terminal, and start a row with the student's words.
    words = INVISIBLE_CHARACTERS.sub(" ", argument).split()  # fillers too: U+3164
    handler.client.leave_reason = " ".join(words)[:MAX_QUIT_REASON_CHARS]
    # Out before "Bye.", so that no join or leave line comes after it.
    handler.room.leave(handler.client)
    handler.reply("*** Bye.")
    handler.quitting = True


# word -> (function, arguments, what it does), in the order /help lists them
STUDENT_COMMANDS = {
    "help": (do_help, "", "list the commands"),
    "nick": (do_nick, "NEWNAME", "change your name"),
    "who": (do_who, "", "list who is online"),
    "me": (do_me, "ACTION", "show an action: * you ACTION"),
    "msg": (do_msg, "NAME TEXT", "send TEXT to NAME only"),
    "quit": (do_quit, "[REASON]", "leave the chat"),
}


# --- The teacher's console: the terminal running the server -------------------
# Adds the teacher: serve() starts a TeacherConsole on the terminal; its
# commands decide who is kicked, banned or muted, and call the few room
# operations that do it (ChatServer's announce(), find(), remove_by_teacher(),
# set_muted(), set_quiet()...). The room's Recorder (below)
# shows room events here and hands them to the Transcript, from one thread.


def lift_mutes(room, name, client=None):
    """/unmute's rule: forget the mutes of name (and of client's address), and
    unmute whoever they held; True if there were any."""
    host, key = (client.host, client.key) if client else (None, None)
    hosts = room.addresses.unmute(name, host, key)
    unmuted = bool(hosts)
    # The student may be back under another name: unmute whoever was
    # muted only by what was just forgotten.
    joined = room.snapshot()[0]
    keys_from = collections.defaultdict(set)
    for other in joined:
        keys_from[other.host].add(other.key)
    for other in joined:
        if other is client or (other.host in hosts and not room.addresses.is_muted(
                other.host, other.key, keys_from.__getitem__)):
            unmuted = room.set_muted(other, False) or unmuted
    return unmuted


class TeacherConsole:
    """Reads the teacher's lines from stdin in a thread and acts on them.

    Being at the server's terminal is the authority: no password is asked.
    Replies are logged, so they appear on that same terminal.
    """

    def __init__(self, room, stream):
        self.room = room  # the ChatServer
        self.stream = stream
        # True when acting for another linked server's teacher (see
        # RedisLink._act_on_private()): what it is told to type, it types there.
        self.for_another_server = False

    def start(self):
        """Start reading in a daemon thread (it never keeps the process alive)."""
        threading.Thread(target=self.run, name="console", daemon=True).start()

    def run(self):
        """Act on each line the teacher types; the server goes on whatever happens."""
        try:
            self.read_lines()
        except Exception as error:  # a thread's top level: log it, never a traceback
            log.error("Console stopped: %r", error)
        # Under nohup, or in a service, no Ctrl+C reaches it: kill (SIGTERM) does the same.
        log.info("Console input has ended: the chat goes on. Ctrl+C (or kill %d) stops "
                 "the server.", os.getpid())

    def read_lines(self):
        """Read until a pipe or file ends; at a terminal, Ctrl+D is not the end."""
        told_ctrl_d = False
        ends = RateWindow(CONSOLE_ENDS_PER_SECOND, 1)  # a terminal that is gone
        while True:
            try:
                line = self.stream.readline()
            except OSError:  # EIO: in a shell's background (SIGTTIN is ignored)
                if not self.wait_for_foreground():
                    return
                continue
            except ValueError:  # stdin was closed
                return
            if line:
                self.handle_line(line)
            elif not self.stream.isatty() or not ends.allow():
                return
            elif not told_ctrl_d:
                told_ctrl_d = True
                log.info("Ctrl+D does not stop the server (Ctrl+C does): type on.")

    def wait_for_foreground(self):
        """Wait until `fg` brings the server back (POSIX); False if it never can."""
        if not in_background(self.stream):
            return False  # no job control here, or the terminal is gone
        log.info("The console is off while the server runs in the background; "
                 "fg brings it back.")
        while in_background(self.stream):
            time.sleep(CONSOLE_FOREGROUND_CHECK_SECONDS)  # no event tells us
        log.info("The console is back: type to announce, /help for commands.")
        return True

    def handle_line(self, line):
        """An announcement, or a /command."""
        text = clean_line(line.encode("utf-8", "replace")).strip()
        if not text:
            return
        if not text.startswith("/") or text.startswith("//"):
            max_line = self.room.settings.max_line
            if len(text.encode("utf-8")) > max_line:  # the students' limit is the teacher's
                self.tell("That line is longer than %d bytes (--max-line): not sent." % max_line)
                return
            self.room.announce(text[1:] if text.startswith("//") else text)
            return
        word, method, argument = parse_command(text, self.COMMANDS)
        if method is None:
            self.tell("Unknown console command: /%s. Type /help to see them." % word)
        else:
            method(self, argument)

    def tell(self, text):
        """Answer the teacher, in order with the room events on the console."""
        self.room.tell_console(text)

    def noted(self, text):
        """Write what the teacher did to the transcript."""
        self.room.note_teacher(text, elsewhere=self.for_another_server)

    def do_help(self, argument):
        self.tell("Console commands (any other line is announced to everyone):")
        for line in describe_commands(self.COMMANDS):
            self.tell("  " + line)
        if self.room._link is not None:
            self.tell("Linked through Redis: /kick, /mute, /unmute, /quiet, /who and "
                      "announcements reach every server; bans, /unban and /shutdown are "
                      "for this server only.")

    def do_kick(self, argument):
        name, _, reason = argument.partition(" ")
        client = self.room.find(name) if name else None
        if client is None:
            self.tell(self.not_here(name, {"k": "kick", "name": name, "reason": reason.strip()},
                                    "kick") if name else "Usage: /kick NAME [REASON]")
            return
        others = [other for other in self.room.connections_from(client.host)[0]
                  if other is not client]
        # Ban first: a connection from there that is still asking for a name
        # then cannot join after all (ChatRoom.join() checks).
        ban = self.ban_after_kick(client, others)
        self.room.remove_by_teacher(client, "*** The teacher removed you from the chat%s"
                                    % (": " + reason if reason else "."))
        waiting = self.close_waiting(client.host, [client])
        if waiting:
            ban += " Also closed %s from it that had not joined." % plural(
                waiting, "connection")
        self.tell("Kicked %s; %s" % (client.name, ban))
        self.noted("kicked %s%s" % (client.name, ": " + reason if reason else ""))

    def not_here(self, name, event, verb):
        """The reply for a name not online here: passed on if it is elsewhere (Redis)."""
        return (self.room.ask_other_server(name, event, verb)
                or self.room.out_of_reach(name)
                or "No one called %s is online." % name)

    def ban_after_kick(self, client, others):
        """Ban a kicked client's address unless others share it; say what was done."""
        minutes = self.room.settings.ban_minutes
        # Bans are per server: the asking console is told whose console lifts it.
        where = " at the console of %s's server" % client.name \
            if self.for_another_server else ""
        if others:
            return ("%s is not banned: %s joined from it too. /ban %s%s disconnects "
                    "everyone there and bans it." % (
                        client.host, list_names(sorted(other.name for other in others)),
                        client.host, where))
        if minutes <= 0:
            return "no ban (--ban-minutes is 0)."
        self.room.addresses.ban(client.host, client.name, minutes)
        return "%s may not rejoin for %s (/unban %s%s lifts it)." % (
            client.host, describe_minutes(minutes), client.name, where)

    def close_waiting(self, host, removed):
        """Close the connections from host that have not joined; return how many.

        removed: the joined clients just removed, which no longer count as joined.
        """
        waiting = [client for client in self.room.connections_from(host)[1]
                   if client not in removed]
        for client in waiting:
            self.room.remove_by_teacher(client, "*** The teacher closed the connections "
                                        "from your computer.")
        return len(waiting)

    def do_ban(self, argument):
        host = typed_address(argument)
        if host is None:
            self.tell("Usage: /ban ADDRESS   (an IP address, as /who shows it)")
            return
        minutes = self.room.settings.ban_minutes
        joined = self.room.connections_from(host)[0]
        if minutes > 0:
            names = ", ".join(client.name for client in joined) or "by address"
            self.room.addresses.ban(host, names, minutes)
        for client in joined:
            self.room.remove_by_teacher(client, "*** The teacher removed everyone at "
                                        "your computer from the chat.")
        waiting = self.close_waiting(host, joined)
        self.tell("Disconnected %s and %s from %s; %s%s" % (
            plural(len(joined), "student"), plural(waiting, "connection"), host,
            "banned for %s." % describe_minutes(minutes) if minutes > 0
            else "no ban (--ban-minutes is 0).",
            " (On this server only: each linked server bans at its own console.)"
            if self.room._link else ""))
        self.room.note_teacher("banned %s" % host)

    def do_unban(self, argument):
        if not argument:
            self.tell("Usage: /unban NAME|ADDRESS")
            return
        host = self.room.addresses.unban(typed_address(argument) or argument)
        if host is None:
            banned = ", ".join(self.room.addresses.banned()) or "none"
            self.tell("No ban matches %s. Banned now: %s.%s" % (
                argument, banned, " (Bans are per server: a student kicked from another "
                "server is let back in at its console.)" if self.room._link else ""))
            return
        self.tell("%s may join again." % host)
        self.room.note_teacher("unbanned %s" % host)

    def do_mute(self, argument):
        client = self.room.find(argument) if argument else None
        if client is None or client.muted:
            self.tell("Usage: /mute NAME" if not argument else
                      self.not_here(argument, {"k": "mute", "name": argument, "on": True},
                                    "mute") if client is None else
                      "%s is muted already." % client.name)
            return
        # A mute follows the student: by address when they are alone on it
        # (any name, any reconnection); when it is shared, by address and
        # name, and once they are gone, any name but those of the others
        # there now (see is_muted()).
        others = [other for other in self.room.connections_from(client.host)[0]
                  if other is not client]
        by_address = not others and self.room.settings.per_address  # (0: a shared address)
        self.room.addresses.mute(client.host, None if by_address else client.key, client.name,
                                 [other.key for other in others])
        self.room.set_muted(client, True)
        self.tell("%s is muted, also after reconnecting from %s%s%s." % (
            client.name, client.host, " under that name; once gone, under any name but "
            "%s (%s the address)" % (list_names(sorted(other.name + "'s" for other in others)),
                                     "who shares" if len(others) == 1 else "who share")
            if others and self.room.settings.per_address
            else ", under any name" if by_address else " under that name",
            "; and the name %s on every linked server" % client.name
            if self.room._link is not None else ""))
        self.noted("muted %s" % client.name)

    def do_unmute(self, argument):
        if not argument:
            self.tell("Usage: /unmute NAME")
            return
        client = self.room.find(argument)
        if client is None:
            elsewhere = self.room.ask_other_server(
                argument, {"k": "mute", "name": argument, "on": False}, "unmute")
            if elsewhere:
                # Muted here before, they would be muted again coming back here;
                # and any server may hold a mute (they may have just left there).
                self.room.addresses.unmute(argument)
                self.room.unmute_elsewhere(argument)
                self.tell(elsewhere)
                return
        unmuted = lift_mutes(self.room, argument, client)
        linked = self.room.unmute_elsewhere(argument)  # Redis link: on every server
        self.tell("%s is no longer muted." % argument if unmuted else
                  "%s is not muted here; the other servers are told to unmute them too."
                  % argument if linked else "%s is not muted." % argument)
        if unmuted:
            self.noted("unmuted %s" % argument)

    def do_quiet(self, argument):
        if argument.lower() not in ("on", "off"):
            self.tell("Usage: /quiet on|off")
            return
        quiet = argument.lower() == "on"
        if not self.room.set_quiet(quiet):
            self.tell("Quiet mode is already %s." % argument.lower())

    def do_who(self, argument):
        joined, waiting, elsewhere = self.room.snapshot()
        link = self.room._link
        muted = (link.muted_anywhere() if link is not None and elsewhere else None) or ()
        for line in describe_who(joined, waiting, elsewhere, muted):
            self.tell(line)

    def do_shutdown(self, argument):
        self.tell("Shutting down at the teacher's request.")
        self.room.stop_serving()

    # word -> (method, arguments, what it does), in the order /help lists them
    COMMANDS = {
        "help": (do_help, "", "list these commands"),
        "kick": (do_kick, "NAME [REASON]", "disconnect NAME (and ban their address "
                 "unless others share it)"),
        "ban": (do_ban, "ADDRESS", "disconnect everyone from ADDRESS and ban it"),
        "unban": (do_unban, "NAME|ADDRESS", "let a banned address join again"),
        "mute": (do_mute, "NAME", "NAME's messages reach nobody"),
        "unmute": (do_unmute, "NAME", "undo /mute"),
        "quiet": (do_quiet, "on|off", "only your announcements go out"),
        "who": (do_who, "", "names, addresses, time online, who has not joined"),
        "shutdown": (do_shutdown, "", "tell everyone, then stop (as Ctrl+C)"),
    }


class Recorder:
    """Room events on their way to the console and the transcript, in the room's order.

    One thread shows them on the console and hands them to the transcript,
    so a paused console or a slow disk never holds up the room. The room
    calls note() with its lock held, so events queue in the room's order.
    """

    def __init__(self, settings, transcript):
        self.settings = settings
        self._transcript = transcript  # a Transcript, or None
        # A SimpleQueue bounded by hand: queue.Queue costs far more per put,
        # and this runs for every line said in the room.
        self._records = queue.SimpleQueue()
        self._lost = 0  # guarded by _lost_lock
        self._lost_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """Show and write what is queued (for a moment at most), then end."""
        self._records.put(("stop", ""))
        join_in_slices(self._thread, SHUTDOWN_GRACE_SECONDS)

    def note(self, kind, line):
        """Queue a room event for the console and the transcript.

        kind: "room" or "private" for what students said, did or were told,
        "silenced" for what a muted student or quiet mode held back, with
        line (name, text); "console" or "warning" for the console only;
        "connection" for the console too, with line (host, "console" or
        "warning", text); "transcript" for the transcript only. Room events
        are noted with the room's lock held, so they queue in the room's
        order; a console line may be noted without it. Never waits: if the
        recorder has fallen RECORD_QUEUE_EVENTS behind, the event is counted
        instead, and the count reported.
        """
        if self._records.qsize() < RECORD_QUEUE_EVENTS:
            self._records.put((kind, line))
        else:
            with self._lost_lock:
                self._lost += 1

    def _run(self):
        # Neither call here can wait: log records go to the console's own
        # thread, and the transcript has one too.
        silenced = SilencedLines()
        connection_lines = ConnectionLines(self.settings)
        idle = True  # nothing was waiting: the next event wakes us (see RECORDER_PAUSE_SECONDS)
        while True:
            try:
                # Woken this often at least, so a count is shown when due.
                kind, line = self._records.get(
                    timeout=min(RECORDER_CHECK_SECONDS, HELD_BACK_REPORT_SECONDS))
            except queue.Empty:
                kind, line = "", ""
            else:
                if idle:
                    time.sleep(RECORDER_PAUSE_SECONDS)  # let the room's sends go first
            if kind == "stop":  # the counts not shown yet are, now
                silenced.report_if_due(at_end=True)
                connection_lines.report_if_due(at_end=True)
                return
            if kind == "connection":
                connection_lines.add(*line)
            elif kind:
                self._record(kind, line, silenced)
            silenced.report_if_due()
            connection_lines.report_if_due()
            with self._lost_lock:
                lost, self._lost = self._lost, 0
            if lost:
                log.warning("%s not shown or written: the server was too busy.",
                            plural(lost, "room event"))
            idle = self._records.empty()

    def _record(self, kind, line, silenced):
        """Show one room event on the console and append it to the transcript."""
        private = kind == "private"
        if private and not self.settings.transcript_private:
            return
        if kind == "silenced":
            silenced.add(*line)
            return
        if kind == "warning":
            log.warning("%s", line)
        elif kind != "transcript":  # for the transcript only
            log.info("%s%s", "(private) " if private else "", line)
        if self._transcript is not None and kind not in ("console", "warning"):
            self._transcript.write(("(private) " if private else "") + line)


class SilencedLines:
    """What muted students and quiet mode held back, for the console: the
    first line of a while in full, then only how many more came.

    A muted student who pastes a thousand lines must not drown the console.
    """

    def __init__(self):
        self._more = collections.Counter()  # name -> lines held back since the last shown
        self._next_report = 0.0  # time.monotonic() when a line may show again

    def add(self, name, line):
        if time.monotonic() >= self._next_report and not self._more:
            log.info("(held back) %s", line)
            self._next_report = time.monotonic() + HELD_BACK_REPORT_SECONDS
        else:
            self._more[name] += 1

    def report_if_due(self, at_end=False):
        if self._more and (at_end or time.monotonic() >= self._next_report):
            lines = plural(sum(self._more.values()), "more line")
            if len(self._more) == 1:
                log.info("(held back %s from %s)", lines, next(iter(self._more)))
            else:
                log.info("(held back %s: %s)", lines, ", ".join(
                    "%d from %s" % (count, name) for name, count in self._more.most_common()))
            self._more.clear()
            self._next_report = time.monotonic() + HELD_BACK_REPORT_SECONDS


class ConnectionLines:
    """What the console says about connections, per computer: the first
    CONNECTION_LINES_SHOWN lines of a while in full, then only how many more.

    A student whose script connects a hundred times a second must not bury
    the chat on the teacher's console. With --per-address 0 (a lab behind
    one address) every line shows: the class is one computer then.
    """

    def __init__(self, settings):
        self.settings = settings
        self._hosts = {}  # host -> [lines shown, lines not shown, end of the while]

    def add(self, host, kind, text):
        now = time.monotonic()
        counts = self._hosts.get(host)
        if counts is None or now >= counts[2]:
            self._report(host)
            counts = self._hosts[host] = [0, 0, now + CONNECTION_LINES_SECONDS]
        if counts[0] < CONNECTION_LINES_SHOWN or not self.settings.per_address:
            counts[0] += 1
            (log.warning if kind == "warning" else log.info)("%s", text)
        else:
            counts[1] += 1

    def report_if_due(self, at_end=False):
        now = time.monotonic()
        for host in [host for host, counts in self._hosts.items()
                     if at_end or now >= counts[2]]:
            self._report(host)

    def _report(self, host):
        counts = self._hosts.pop(host, None)
        if counts is not None and counts[1]:
            log.info("(%s about connections from %s not shown one by one)",
                     plural(counts[1], "more line"), host)


class Transcript:
    """The --transcript file, appended to by a thread of its own.

    A full disk or a hung network drive never holds up the room or the
    console: lines wait in a bounded queue (past it they are counted), each
    line is written whole or not at all, and writing starts again by itself
    when the disk takes it; the console says what could not be written.
    """

    def __init__(self, path):
        self.path = path
        # Unbuffered: each line is one write() to the OS, so a killed server
        # loses nothing, and a short write is seen (and undone) at once.
        self._file = open(path, "ab", buffering=0, opener=open_without_waiting)
        self._lines = queue.Queue(TRANSCRIPT_QUEUE_LINES)
        self._lost = 0  # lines the queue had no room for
        self._lost_lock = threading.Lock()  # guards _lost (two threads touch it)
        self._thread = threading.Thread(target=self._run, name="transcript", daemon=True)
        self._thread.start()

    def write(self, text):
        """Append one line, with a timestamp, soon; never waits."""
        line = "%s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), text)
        try:
            self._lines.put_nowait(line.encode("utf-8"))
        except queue.Full:
            with self._lost_lock:
                self._lost += 1  # reported when the writer catches up

    def close(self):
        """Write what is queued and close, waiting a moment at most (the disk may hang)."""
        try:
            self._lines.put(None, timeout=SHUTDOWN_GRACE_SECONDS)
        except queue.Full:
            return
        join_in_slices(self._thread, SHUTDOWN_GRACE_SECONDS)

    def _run(self):
        unwritten = 0  # lines the disk refused since the last that it took
        for data in iter(self._lines.get, None):
            error = self._append_whole(data)
            if error is None:
                with self._lost_lock:
                    dropped, self._lost = self._lost, 0
                if unwritten or dropped:
                    lost = unwritten + dropped
                    log.warning("The transcript is being written again; %s could "
                                "not be written.", plural(lost, "line"))
                unwritten = 0
                continue
            if not unwritten:
                log.warning("Could not write the transcript %s (%s): lines are counted "
                            "until the disk takes them again.", self.path, error)
            unwritten += 1
        try:
            self._file.close()
        except OSError:
            pass  # what could not be written was reported already

    def _append_whole(self, data):
        """Append data to the file; None if it all went, else the error."""
        self._reopen_if_moved()
        descriptor = self._file.fileno()
        try:
            size = os.fstat(descriptor).st_size
            written = self._file.write(data)
        except OSError as error:
            return error.strerror or error
        if written == len(data):
            return None
        try:
            os.ftruncate(descriptor, size)  # never leave half a line behind
        except OSError:
            pass
        return "the disk is full"

    def _reopen_if_moved(self):
        """Start a new file at the path if the teacher deleted or renamed ours.

        Else every line would go on into a file nobody can see any more.
        """
        if os.name == "nt":
            return  # Windows lets nobody move or delete a file that is open
        try:
            moved = not os.path.samestat(os.stat(self.path), os.fstat(self._file.fileno()))
        except FileNotFoundError:
            moved = True
        except OSError:
            return  # cannot tell (a network drive's hiccup): keep the file we have
        if not moved:
            return
        try:
            new_file = open(self.path, "ab", buffering=0, opener=open_without_waiting)
        except OSError:
            return  # its folder is gone too: _append_whole() goes on as it can
        try:
            self._file.close()
        except OSError:
            pass  # a network drive's late write error: the new file goes on
        self._file = new_file
        log.warning("The transcript %s was moved or deleted: a new one is written there.",
                    self.path)


def open_without_waiting(path, flags):
    """os.open for the transcript, which must never hang the server.

    A named pipe that nobody reads would make open() wait for ever; with
    O_NONBLOCK (POSIX only) it fails at once instead, with a clear error.
    """
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)


def describe_who(joined, waiting, elsewhere=(), muted_elsewhere=()):
    """The console's /who: a table of the joined, then who has not joined yet.

    elsewhere: students on other servers (Redis link), in the same table;
    muted_elsewhere: the keys of those muted.
    """
    now = time.monotonic()
    rows = [(client.name, "%s:%s" % (client.host, client.address[1]),
             describe_duration(now - client.joined_at), who_notes(client))
            for client in joined]
    rows += [(student.name, "another server (%s)" % student.server, "",
              "muted" if fold_name(student.name) in muted_elsewhere else "")
             for student in elsewhere]
    lines = ["%s online%s, %s not joined yet." % (
        len(joined), ", %d on other servers" % len(elsewhere) if elsewhere else "",
        len(waiting))]
    if rows:
        widths = [max(display_width(row[column]) for row in rows + [("NAME", "ADDRESS")])
                  for column in (0, 1)]
        for row in [("NAME", "ADDRESS", "ONLINE", "")] + rows:
            lines.append("  ".join([pad(row[0], widths[0]), pad(row[1], widths[1]),
                                    "%-8s" % row[2], row[3]]).rstrip())
    if waiting:
        hosts = collections.Counter(client.host for client in waiting)
        lines.append("Not joined yet: " + ", ".join(
            "%s (%d)" % (host, count) if count > 1 else host
            for host, count in sorted(hosts.items())))
    return lines


def who_notes(client):
    """What the console's /who says of a joined client after its time online."""
    notes = ["browser"] if client.via == "browser" else []
    if client.muted:
        notes.append("muted")
    return ", ".join(notes)


def display_width(text):
    """Columns text takes in a terminal: wide (CJK) characters take two, marks none."""
    return sum(0 if unicodedata.combining(character) else
               2 if unicodedata.east_asian_width(character) in "WF" else 1
               for character in text)


def console_columns():
    """How wide the console (stderr) is, now: the teacher may resize it."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no stderr, or not a terminal
        return shutil.get_terminal_size().columns  # $COLUMNS, or 80


def fit_to_terminal(text, columns, indent=" " * 9):
    """text cut into rows of fewer than columns, each after the first indented.

    A terminal wraps a long line at its right edge, and the next row starts
    at the left, where a console line starts with its time: a student who
    pads a line with spaces could make that row look like a line of its own
    ("09:15:02 bob says: ..."). Cut here, the rest of the line goes on
    indented instead. (The indent is as wide as the time: "HH:MM:SS ".)
    """
    if columns <= len(indent) + 10 or display_width(text) < columns:
        return text  # (a terminal too narrow for this to help, or a short line)
    rows = []
    for line in text.split("\n"):  # the server's own tables (/who) keep their rows
        row, used = "", 0
        for character in line:
            width = display_width(character)
            if used + width >= columns:
                rows.append(row)
                row, used = indent, len(indent)
            row += character
            used += width
        rows.append(row)
    return "\n".join(rows)


def pad(text, width):
    return text + " " * (width - display_width(text))


def describe_duration(seconds):
    """'20 s', '3 min', '1 h 05 min': how long someone has been online."""
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min" % (seconds // 60)
    return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)


def in_background(stream):
    """True if this process runs in its terminal's background (POSIX job control)."""
    if not hasattr(os, "tcgetpgrp"):
        return False
    try:
        return os.tcgetpgrp(stream.fileno()) != os.getpgrp()
    except (OSError, ValueError):
        return False  # not a terminal, or it is gone


def console_input():
    """stdin for the teacher's console, or None if there is none to read."""
    if sys.stdin is None:  # pythonw, or a service
        return None
    if hasattr(signal, "SIGTTIN"):
        # Started in a shell's background ("python chat_server.py &"), reading
        # the terminal would stop the whole server. Ignoring SIGTTIN turns
        # that read into an error instead: the console waits for `fg`.
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    return sys.stdin


# --- The browser page: HTTP and WebSocket on the chat port --------------------
# Adds students who have only a browser. greet() (before joining) hands a
# connection whose first bytes look like an HTTP request to answer_http(): it
# reads the request head on its own, then answers with the page, this file,
# or an error, or upgrades to a WebSocket (RFC 6455). A WebSocket student is
# then a Client like any other: WebSocketLines turns frames into the same
# lines ChatHandler.take_bytes() gets from TCP, and the Client's encode_lines
# turns the room's lines into text frames.

HTTP_HEAD_MAX_BYTES = 16 * 1024  # a real browser's request head is under 2 KiB
HTTP_LINE_MAX_BYTES = 8 * 1024  # one header line (long cookies, say)
HTTP_HEAD_MAX_LINES = 100  # header lines in one request
HTTP_HEAD_TIMEOUT_SECONDS = 10.0  # fixed: --name-timeout 0 does not lift it
HTTP_SEND_SECONDS = 30.0  # to send this file (about 320 KiB) over a poor Wi-Fi link
WEBSOCKET_PATH = "/chat"  # where the page opens its WebSocket
PAGE_LINES_KEPT = 1000  # the page forgets older lines: laying out the log (each
#                         new line does) costs a browser about 1 ms per 1000
WEBSOCKET_MIN_MESSAGE_BYTES = 64 * 1024  # see websocket_message_limit()
SOURCE_FILE_NAME = "chat_server.py"  # GET /chat_server.py downloads this file
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3

# Frame opcodes (RFC 6455, section 5.2) and the close codes we send (7.4.1).
OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY = 0x0, 0x1, 0x2
OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x8, 0x9, 0xA
CONTROL_PAYLOAD_MAX_BYTES = 125  # the protocol's own limit for control frames
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002  # an unmasked frame, a bad opcode or fragment
CLOSE_UNSUPPORTED_DATA = 1003  # a binary message: the chat is text
CLOSE_NO_STATUS = 1005  # what a close frame without a code means (never sent)
CLOSE_BAD_DATA = 1007  # text that is not UTF-8
CLOSE_TOO_BIG = 1009  # a frame or message over websocket_message_limit()

HTTP_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/(\d)\.(\d)$")
HTTP_START = re.compile(rb"^[A-Z]+ \S")  # what a request looks like before its line end
HEAD_END = re.compile(rb"\r?\n\r?\n")
HOST_AND_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?$")


class WebSocketError(Exception):
    """A protocol error: the connection closes with this close code."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def websocket_message_limit(settings):
    """The largest frame or message accepted: room for a long line, never megabytes."""
    return max(4 * settings.max_line, WEBSOCKET_MIN_MESSAGE_BYTES)


def encode_frame(opcode, payload):
    """One whole, unmasked frame from the server (servers never mask, 5.1)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def encode_websocket_lines(lines):
    """The room's lines as ONE text message: whole lines, each ended with CR LF.

    One message may carry several lines (a sender's batch, say); a line is
    never split across messages, so the page splits each message at CR LF.
    """
    return encode_frame(OPCODE_TEXT, encode_lines(lines))


def close_frame(code, reason=""):
    """A close frame with its code and a short reason (at most 123 bytes)."""
    return encode_frame(OPCODE_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])


def unmask(payload, key):
    """XOR the payload with the 4-byte masking key, as one big integer (fast)."""
    size = len(payload)
    keystream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
        size, "big")


class WebSocketDecoder:
    """Turns bytes from a browser into messages: no sockets here (sans-I/O).

    feed() returns events: ("text", bytes) for a whole text message,
    ("ping", bytes), ("pong", bytes), ("close", code, reason). It raises
    WebSocketError for anything RFC 6455 forbids, and judges a frame's size
    from its header, before its body has arrived.
    """

    def __init__(self, max_message_bytes):
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        # The text message still coming, as one bytearray (so that frames with
        # nothing in them cost nothing), or None.
        self._fragments = None

    def feed(self, data):
        """Return the events that data completes (see the class docstring)."""
        self._buffer += data
        events = []
        while True:
            frame = self._take_frame()
            if frame is None:
                return events
            event = self._on_frame(*frame)
            if event is not None:
                events.append(event)

    def _take_frame(self):
        """Cut one whole frame off the buffer: (fin, opcode, payload), or None if short."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        size = second & 0x7F  # 126 and 127 mean: the size follows, in 2 or 8 bytes
        start = {126: 4, 127: 10}.get(size, 2)  # where the masking key begins
        if len(buffer) < start:
            return None
        if size >= 126:
            size = int.from_bytes(buffer[2:start], "big")
        opcode = first & 0x0F
        self._check_header(first, opcode, first & 0x80, second & 0x80, size)
        end = start + 4 + size
        if len(buffer) < end:
            return None
        key, payload = bytes(buffer[start:start + 4]), bytes(buffer[start + 4:end])
        del buffer[:end]
        return first & 0x80, opcode, unmask(payload, key)

    def _check_header(self, first_byte, opcode, fin, masked, size):
        """Refuse a frame from its header alone: before its body is read."""
        if first_byte & 0x70:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if not masked:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
        if opcode >= OPCODE_CLOSE:
            if opcode not in (OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unknown opcode %d" % opcode)
            if not fin or size > CONTROL_PAYLOAD_MAX_BYTES:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented or long control frame")
            return
        if opcode == OPCODE_BINARY:
            raise WebSocketError(CLOSE_UNSUPPORTED_DATA, "binary message")
        if opcode not in (OPCODE_TEXT, OPCODE_CONTINUATION):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unknown opcode %d" % opcode)
        if (opcode == OPCODE_CONTINUATION) != (self._fragments is not None):
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragments out of order")
        if len(self._fragments or b"") + size > self.max_message_bytes:
            raise WebSocketError(CLOSE_TOO_BIG,
                                 "message over %d bytes" % self.max_message_bytes)

    def _on_frame(self, fin, opcode, payload):
        """Assemble messages from frames; return an event, or None."""
        if opcode == OPCODE_CLOSE:
            return ("close",) + parse_close_payload(payload)
        if opcode in (OPCODE_PING, OPCODE_PONG):
            return ("ping" if opcode == OPCODE_PING else "pong", payload)
        if self._fragments is None:
            self._fragments = bytearray()
        self._fragments += payload
        if not fin:
            return None
        message, self._fragments = bytes(self._fragments), None
        try:
            message.decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketError(CLOSE_BAD_DATA, "text message is not UTF-8") from None
        return ("text", message)


def parse_close_payload(payload):
    """(code, reason) from a close frame's payload; WebSocketError if malformed."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_BAD_DATA, "close reason is not UTF-8") from None
    code = struct.unpack("!H", payload[:2])[0]
    # RFC 6455 7.4: 1004-1006 and 1015 never go on the wire; below 1000, and
    # from 1016 to 2999, nothing is defined.
    if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999):
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close code %d" % code)
    return code, reason


class WebSocketLines:
    """Makes a WebSocket look like a line stream to ChatHandler.

    take_bytes() takes bytes from the socket and returns the client's lines
    (str, or TOO_LONG for a message over --max-line), exactly what the
    telnet filter and LineFramer give for a TCP client. It answers pings,
    and closes the connection on a close frame or a protocol error.
    """

    def __init__(self, client, room):
        self.client = client
        self.room = room  # for its console
        self.max_line = room.settings.max_line
        self.decoder = WebSocketDecoder(websocket_message_limit(room.settings))
        self.close_sent = False  # a close frame went out: ignore the rest

    def take_bytes(self, data):
        if self.close_sent:
            return []
        try:
            events = self.decoder.feed(data)
        except WebSocketError as error:
            self.room.tell_console("Closed %s: WebSocket protocol error, %s (code %d)" % (
                self.client, error.reason, error.code), warning=True, host=self.client.host)
            self.close(error.code, error.reason)
            return []
        lines = []
        for event in events:
            lines.extend(self._on_event(event))
        return lines

    def _on_event(self, event):
        kind = event[0]
        if kind == "ping":
            self.client.send_bytes(encode_frame(OPCODE_PONG, event[1]))
        elif kind == "close":
            self.close(CLOSE_NORMAL, "")  # answer the close (RFC 6455, 5.5.1)
        elif kind == "text" and not self.close_sent:
            return message_lines(event[1], self.max_line)
        return []  # a pong, or text after the close

    def close(self, code, reason):
        """Send a close frame after what is queued, then shut the socket."""
        self.close_sent = True
        self.client.closing_bytes = close_frame(code, reason)
        self.client.close_when_sent()


def message_lines(message, max_line):
    """The lines in one text message from the page (usually exactly one)."""
    if len(message) > max_line:
        return [TOO_LONG]  # the same notice as a long TCP line; the connection stays
    pieces = LINE_END.split(message)
    if len(pieces) > 1 and not pieces[-1]:
        pieces.pop()  # "text\n" is one line, not a line and an empty one
    return [clean_line(piece) for piece in pieces]


# -- The HTTP side: read a request head, answer it --


class HttpRequest:
    """A parsed request head: method, path, version and headers (names in lower case)."""

    def __init__(self, method, target, version, headers, rest):
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.version = version
        self.headers = headers
        self.rest = rest  # bytes that came after the head

    def header(self, name):
        return self.headers.get(name, "")

    def has_token(self, name, token):
        """True if the comma-separated header name contains token (any case)."""
        return token in [part.strip().lower() for part in self.header(name).split(",")]

    def wants_websocket(self):
        return self.header("upgrade").lower() == "websocket" or self.has_token(
            "connection", "upgrade")


class BadRequest(Exception):
    """A request head we will not read further: carries the status to answer with."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def looks_like_http(data):
    """True if the first bytes a client sent are an HTTP request (or its start)."""
    first_line = LINE_END.split(data, 1)[0]
    if len(first_line) < len(data):  # the first line is complete
        return bool(HTTP_REQUEST_LINE.match(first_line))
    return bool(HTTP_START.match(first_line))


def head_problem(data):
    """Say which limit a (partial) request head breaks, or None."""
    if len(data) > HTTP_HEAD_MAX_BYTES:
        return "request head over %d bytes" % HTTP_HEAD_MAX_BYTES
    lines = LINE_END.split(data)
    if len(lines) > HTTP_HEAD_MAX_LINES + 2:
        return "more than %d header lines" % HTTP_HEAD_MAX_LINES
    if any(len(line) > HTTP_LINE_MAX_BYTES for line in lines):
        return "a header line over %d bytes" % HTTP_LINE_MAX_BYTES
    return None


def parse_request_head(data):
    """An HttpRequest from bytes holding a whole head; BadRequest if malformed."""
    head, rest = HEAD_END.split(data, 1)
    first, *header_lines = LINE_END.split(head)
    match = HTTP_REQUEST_LINE.match(first)
    if not match:
        raise BadRequest(400, "not an HTTP request line")
    method, target, major, minor = (part.decode("latin-1") for part in match.groups())
    headers = {}
    for line in header_lines:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        name, value = name.lower(), value.strip()
        headers[name] = headers[name] + ", " + value if name in headers else value
    return HttpRequest(method, target, (int(major), int(minor)), headers, rest)


def read_request_head(recv, data):
    """Read the rest of a request head that began with data; an HttpRequest.

    recv(timeout) gives more bytes (see recv_unpaced()). The head is read on
    its own (not by LineFramer: its limits are for chat lines), with the HTTP
    limits above and a fixed deadline. Raises BadRequest when a limit is
    passed, or the client leaves or stalls.
    """
    deadline = time.monotonic() + HTTP_HEAD_TIMEOUT_SECONDS
    data = bytes(data)
    while not HEAD_END.search(data):
        if not looks_like_http(data):  # its first line turned out not to be a request
            raise BadRequest(400, "not an HTTP request line")
        problem = head_problem(data)
        if problem:
            raise BadRequest(431, problem)
        more = recv(deadline - time.monotonic())
        if more is None:
            raise BadRequest(408, "request head not finished in %g s"
                             % HTTP_HEAD_TIMEOUT_SECONDS)
        if not more:
            raise BadRequest(0, "closed during the request head")  # 0: no answer
        data += more
    problem = head_problem(HEAD_END.split(data, 1)[0])
    if problem:
        raise BadRequest(431, problem)
    return parse_request_head(data)


HTTP_REASONS = {
    101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    421: "Misdirected Request", 426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}
# Sent with every answer: no caching, no guessing of types, no Referer to
# other sites. The page adds its Content-Security-Policy.
SAFE_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


def http_response(status, body=b"", content_type="text/plain; charset=utf-8", headers=()):
    """A whole HTTP/1.1 answer, closing the connection after it."""
    lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS[status])]
    lines += ["%s: %s" % pair for pair in SAFE_HEADERS + list(headers)]
    lines += ["Content-Type: " + content_type, "Content-Length: %d" % len(body),
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def text_response(status, text, headers=()):
    """A short plain-text answer: the status and one sentence."""
    return http_response(status, ("%d %s: %s\r\n" % (status, HTTP_REASONS[status], text))
                         .encode("utf-8"), headers=headers)


def websocket_handshake(request):
    """The 101 answer to a valid upgrade request; BadRequest if it is not one."""
    if request.header("sec-websocket-version") != "13":
        raise BadRequest(426, "WebSocket version %r, not 13"
                         % request.header("sec-websocket-version"))
    key = request.header("sec-websocket-key")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (ValueError, binascii.Error):
        valid_key = False
    upgrade = (request.has_token("connection", "upgrade")
               and request.header("upgrade").lower() == "websocket")
    if not (valid_key and upgrade and request.version >= (1, 1)):
        raise BadRequest(400, "not a valid WebSocket upgrade")
    accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest())
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n" % accept.decode("ascii")).encode("ascii")


def host_is_ours(host_header):
    """True if a Host header names this machine: an IP address, localhost or our name.

    Refusing other names stops DNS rebinding: a web page on evil.example
    whose name is made to point at this machine cannot join the room.
    """
    match = HOST_AND_PORT.match(host_header)
    if not match:
        return False
    host = match.group(1).strip("[]").rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    our_name = socket.gethostname().lower()
    return host in ("localhost", our_name, our_name.split(".")[0], our_name + ".local")


def origin_problem(request):
    """Why an upgrade's Origin or Host is refused, or None (see host_is_ours())."""
    host = request.header("host")
    if not host_is_ours(host):
        return "Host %r is not this machine" % host[:100]
    origin = request.header("origin")
    if origin and origin.lower() != "http://" + host.lower():
        return "Origin %r is not this page" % origin[:100]
    return None


def answer_http(handler, data):
    """Serve a browser whose request began with data; True if it became a WebSocket."""
    client = handler.client
    try:
        request = read_request_head(lambda timeout: recv_unpaced(handler, timeout), data)
        answer, upgraded = route_request(request, client.sock.getsockname())
        if request.path == "/" + SOURCE_FILE_NAME and \
                not handler.room.addresses.may_download(client.host):
            raise BadRequest(429, "too many downloads of %s from %s: try again in a minute"
                             % (SOURCE_FILE_NAME, client.host))
    except BadRequest as refusal:
        handler.room.tell_console("Closed %s: %s" % (client, refusal.reason), host=client.host)
        if refusal.status:
            extra = [("Sec-WebSocket-Version", "13")] if refusal.status == 426 else []
            send_http_answer(client, text_response(refusal.status, refusal.reason, extra))
        return False
    if not upgraded:
        if request.path == "/":
            handler.room.addresses.page_sent(client.host)  # see may_be_spare()
        if request.path != "/favicon.ico":  # every browser asks: not worth a line
            handler.room.tell_console("Sent %s to %s" % (
                "the chat page" if request.path == "/" else SOURCE_FILE_NAME, client),
                host=client.host)
        send_http_answer(client, answer)
        return False
    client.send_bytes(answer)
    client.via = "browser"
    client.encode_lines = encode_websocket_lines
    client.closing_bytes = close_frame(CLOSE_NORMAL)  # kicked, /quit, shutdown
    handler.framing = WebSocketLines(client, handler.room)  # no telnet filter: frames
    handler.room.tell_console("Upgraded %s to a WebSocket: a browser student" % client,
                              host=client.host)
    if request.rest:  # frames sent right behind the request
        handler.take_bytes(request.rest)
    return True


def recv_unpaced(handler, timeout):
    """Wait up to timeout seconds for bytes: b'' at the end, None if none came.

    Not ChatHandler.wait_for_bytes(): a request head is not chat, so it is never paced.
    """
    deadline = time.monotonic() + timeout
    while timeout > 0 and handler.readable.select(timeout):
        try:
            return handler.request.recv(RECV_BYTES)
        except BlockingIOError:  # woken without data after all: wait again
            timeout = deadline - time.monotonic()
    return None


def send_http_answer(client, answer):
    """Send a whole answer, then close; wait up to HTTP_SEND_SECONDS for a slow network."""
    # The answer is ours and bounded (this file is the biggest): let it past
    # --sendq, which is meant for chat lines piling up for a slow reader.
    client.sendq_bytes = max(client.sendq_bytes, len(answer))
    client.send_bytes(answer)
    client.close_when_sent(HTTP_SEND_SECONDS)
    client.wait_closed(HTTP_SEND_SECONDS)  # ends early at shutdown


def route_request(request, reached=None):
    """The answer to a request: (bytes, True if they upgrade to a WebSocket).

    reached: the (host, port) the browser connected to, for a page asked for
    by a name this server does not answer to (see host_is_ours()).
    """
    if request.method != "GET":
        raise BadRequest(405, "method %s" % request.method[:20])
    if request.path == WEBSOCKET_PATH:
        if not request.wants_websocket():
            raise BadRequest(426, "a plain GET of the WebSocket path")
        problem = origin_problem(request)
        if problem:
            raise BadRequest(403, problem)
        return websocket_handshake(request), True
    if request.path == "/":
        host = request.header("host")
        if reached is not None and host and not host_is_ours(host):
            # Its WebSocket would be refused: say so now, and how to get in.
            # (The name is the browser's text: printable ASCII only, as the
            # console shows it too.)
            raise BadRequest(421, "This chat server does not answer to the name %s (so "
                             "that no other web page can reach it). Open http://%s/ "
                             "instead." % (re.sub(r"[^\x21-\x7e]", "?", host[:100]),
                                           format_address((normal_host(reached[0]).split(
                                               "%")[0], reached[1]))))
        return page_response(), False
    if request.path == "/" + SOURCE_FILE_NAME:
        return source_response(), False
    if request.path == "/favicon.ico":
        # Chromium asks at once, on the spare connection it opened with the
        # page: answered, that one cannot later meet the chat's greeting.
        return text_response(404, "no icon here"), False
    raise BadRequest(404, "no page at %r" % request.path[:100])


def page_response():
    return http_response(200, PAGE_HTML, "text/html; charset=utf-8",
                         [("Content-Security-Policy", PAGE_CSP)])


def source_response():
    """This very file, as a download: the --connect client for anyone with Python."""
    try:
        with open(__file__, "rb") as source:
            body = source.read()
    except OSError as error:  # run from a zip, say
        raise BadRequest(404, "cannot read %s: %s" % (SOURCE_FILE_NAME, error)) from None
    return http_response(200, body, "text/x-python; charset=utf-8", [
        ("Content-Disposition", 'attachment; filename="%s"' % SOURCE_FILE_NAME)])


def refusal_answer(first_bytes, reason):
    """What to send a connection refused before a thread, given its first bytes.

    An HTTP request gets a 503 page, a WebSocket upgrade the handshake, the
    reason as one text message and a close, anything else (a request head not
    yet complete too) the line "*** REASON".
    """
    line = "*** " + reason
    if not (first_bytes and looks_like_http(first_bytes) and HEAD_END.search(first_bytes)):
        return encode_line(line)
    try:
        request = parse_request_head(first_bytes)
        if request.path == WEBSOCKET_PATH and request.wants_websocket():
            return (websocket_handshake(request) + encode_websocket_lines([line])
                    + close_frame(CLOSE_NORMAL))
    except BadRequest:
        pass  # not a valid upgrade: a plain answer will do
    return text_response(503, reason)


def identify_late_request(handler, line):
    """True (and logged) if a client's first line is an HTTP request.

    A browser's preconnected socket may send its request only after the
    first prompt went out; it cannot be answered as HTTP any more, but it
    must never be taken as a password or a name.
    """
    if handler.lines_read > 1 or isinstance(handler.framing, WebSocketLines):
        return False
    if not isinstance(line, str) or not HTTP_REQUEST.match(line):
        return False
    handler.room.tell_console("Closed %s: a browser request that came after the first "
                              "prompt (%r)" % (handler.client, line[:100]),
                              host=handler.client.host)
    return True


# -- The page: every byte of it is here (a lab may have no internet) --
# It inserts text with textContent only, never as HTML, and makes no links
# from text: nothing a student types can become markup on anyone's page.

PAGE_STYLE = """
:root { color-scheme: light dark; --bg: #fdfdfc; --fg: #1b1b1b; --muted: #595959;
  --server: #5a4a00; --server-bg: #fff6d6; --me: #0b4f9c; --line: #c9c9c9;
  --accent: #0b57d0; --alert: #a50e0e; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #16181c; --fg: #ececec; --muted: #b0b0b0; --server: #f3d67a;
    --server-bg: #2a2614; --me: #8cc4ff; --line: #3c3f45; --accent: #8ab4f8;
    --alert: #ff8a80; }
}
* { box-sizing: border-box; }
html { font-size: clamp(16px, 0.6vw + 12px, 30px); }
body { margin: 0; background: var(--bg); color: var(--fg);
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  display: flex; flex-direction: column; height: 100vh; height: 100dvh; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0.2rem 1rem;
  padding: 0.5rem 0.75rem; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.15rem; margin: 0; }
#status { margin: 0; color: var(--muted); flex: 1; }
#status.gone { color: var(--alert); font-weight: bold; }
a { color: var(--accent); }
/* overflow-anchor: the script keeps a reader's place itself, in every browser */
#log { flex: 1; overflow-y: auto; overflow-anchor: none; padding: 0.5rem 0.75rem;
  line-height: 1.4;
  overflow-wrap: anywhere; white-space: pre-wrap; }
/* A hanging indent: a line that wraps goes on indented, so a student who pads
   a line with spaces cannot make a row of it look like a line of its own. */
#log div { padding: 0.05rem 0 0.05rem 1.5rem; text-indent: -1.5rem; }
#log .server { color: var(--server); background: var(--server-bg);
  border-left: 0.25rem solid var(--server); padding-left: 1.9rem; margin: 0.1rem 0; }
#log .server .words { color: var(--fg); }  /* a leave's reason: the student's words */
#log .mine { color: var(--me); }
#log .mine::before { content: "you: "; font-weight: bold; }
form, #again { display: flex; gap: 0.5rem; padding: 0.5rem 0.75rem;
  border-top: 1px solid var(--line); align-items: center; }
label { font-weight: bold; }
input { flex: 1; min-width: 0; font: inherit; padding: 0.4rem 0.5rem;
  border: 2px solid var(--line); border-radius: 0.3rem;
  background: var(--bg); color: var(--fg); }
button { font: inherit; padding: 0.4rem 0.9rem; border-radius: 0.3rem;
  border: 2px solid var(--accent); background: var(--accent); color: var(--bg);
  cursor: pointer; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
#again p { margin: 0; flex: 1; color: var(--alert); font-weight: bold; }
[hidden] { display: none !important; }
"""

PAGE_SCRIPT = """
"use strict";
const log = document.getElementById("log");
const form = document.getElementById("send");
const input = document.getElementById("line");
const label = document.getElementById("label");
const status = document.getElementById("status");
const again = document.getElementById("again");
let socket = null;

function nearBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

let owed = 0;  // the part of a scroll the browser rounded off: added to the next
const LEAVE_REASON = /^(\\*\\*\\* \\S+ left the chat\\. )(\\(.*\\))$/;

// Adds [text, kind] pairs to the log, then scrolls once for them all.
function show(lines) {
  const follow = nearBottom();
  for (const [text, kind] of lines) {
    const line = document.createElement("div");
    line.className = kind;
    // A leave's reason is the student's words, not the server's: drawn so.
    const reason = kind === "server" ? LEAVE_REASON.exec(text) : null;
    line.textContent = reason ? reason[1] : text;  // text only: never parsed as HTML
    if (reason) {
      const words = document.createElement("span");
      words.className = "words";
      words.textContent = reason[2];
      line.appendChild(words);
    }
    log.appendChild(line);
  }
  const extra = log.childElementCount - PAGE_LINES_KEPT;
  if (extra > 0) {  // the oldest lines go; a student scrolled up keeps their place
    const kept = log.children[extra];
    const before = follow ? 0 : kept.getBoundingClientRect().top;
    while (log.firstElementChild !== kept) log.firstElementChild.remove();
    if (!follow) {
      const wanted = log.scrollTop + kept.getBoundingClientRect().top - before + owed;
      log.scrollTop = wanted;
      owed = wanted - log.scrollTop;
    }
  }
  if (follow) log.scrollTop = log.scrollHeight;  // unless the student scrolled up
}

function askingPassword(on) {
  input.type = on ? "password" : "text";
  label.textContent = on ? "Password" : "Message";
}

function received(event) {
  // Each message carries one or more whole lines, each ended by CR LF.
  const lines = String(event.data).split("\\r\\n");
  lines.pop();
  const shown = [];
  for (const text of lines) {
    const fromServer = text.startsWith("*** ");
    shown.push([text, fromServer ? "server" : "said"]);
    // Only the server's own question: a teacher's line may end in "Password?".
    if (fromServer) askingPassword(text === "*** This room has a password. Password?");
  }
  show(shown);
}

function disconnected() {
  if (socket === null) return;
  socket = null;
  status.textContent = "Disconnected";
  status.className = "gone";
  show([["*** Disconnected from the chat.", "server"]]);
  form.hidden = true;
  again.hidden = false;
  document.getElementById("rejoin").focus();
}

function join() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + "WEBSOCKET_PATH");
  status.textContent = "Connecting\\u2026";
  status.className = "";
  again.hidden = true;
  form.hidden = false;
  askingPassword(false);
  socket.addEventListener("open", () => {
    status.textContent = "Connected";
    input.focus();
  });
  socket.addEventListener("message", received);
  socket.addEventListener("close", disconnected);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (socket === null || socket.readyState !== WebSocket.OPEN) return;
  const text = input.value;
  socket.send(text);
  show([[input.type === "password" ? "\\u2022".repeat(8) : text, "mine"]]);
  input.value = "";
  askingPassword(false);
});
document.getElementById("rejoin").addEventListener("click", join);
join();
""".replace("WEBSOCKET_PATH", WEBSOCKET_PATH).replace("PAGE_LINES_KEPT", str(PAGE_LINES_KEPT))

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Classroom chat</title>
<style>%s</style>
</head>
<body>
<header>
<h1>Classroom chat</h1>
<p id="status" role="status">Connecting&hellip;</p>
<a href="/%s" download>Download chat_server.py</a>
</header>
<main id="log" role="log" aria-live="polite" tabindex="0"></main>
<form id="send" autocomplete="off">
<label id="label" for="line">Message</label>
<input id="line" type="text" autofocus enterkeyhint="send" autocapitalize="off"
 spellcheck="false">
<button type="submit">Send</button>
</form>
<div id="again" hidden>
<p>Disconnected: the server closed the chat, or the network is gone.</p>
<button id="rejoin" type="button">Join again</button>
</div>
<script>%s</script>
</body>
</html>
"""


def csp_hash(text):
    """The Content-Security-Policy source for one inline script or style."""
    return "'sha256-%s'" % base64.b64encode(
        hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


PAGE_HTML = (PAGE_TEMPLATE % (PAGE_STYLE, SOURCE_FILE_NAME, PAGE_SCRIPT)).encode("utf-8")
# Only the page's own script and style run, it may connect only to its own
# server, and no other site may frame it.
PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self'; frame-ancestors 'none'" % (csp_hash(PAGE_SCRIPT),
                                                         csp_hash(PAGE_STYLE)))


# --- Several servers, one room: the Redis link --------------------------------
#
# With --redis, this server shares its room with every other server linked
# to the same Redis and room name. It adds a RESP client (Redis's protocol,
# spoken here with the standard library only) and a RedisLink; the room
# hooks in at a few marked places ("Redis link:").
#
# How one room is kept across servers:
#   * Room events go into one Redis stream (XADD). Each server reads that
#     stream (XREAD BLOCK) and shows what it reads, its own events too, so
#     every student on every server sees one order: the stream's.
#   * Every event carries (server, sequence). A server's sequences rise, so
#     an event read twice (sent again after a reconnect) is skipped.
#   * Names are claimed in Redis (SET NX EX), refreshed while the student is
#     here; each server also keeps a heartbeat key alive. A server whose
#     heartbeat has been gone for as long again as it lasts is dead: its
#     students' names are deleted by the others, and only the server whose
#     DEL returned 1 announces the leave (for a name Redis forgot in a
#     restart, the first to ask: see REAP_SCRIPT).
#   * Private messages and the teacher's /kick and /mute for a student on
#     another server go over that server's own pub/sub channel: never stored.
#     A whisper leaves a mark in the stream (which whisper, not its text):
#     that server shows nothing after the mark before the whisper itself, and
#     one that was cut off finds, at its relink, the marks of whispers it
#     never got, and tells their servers ("missed").
#     An /unmute goes to every server, on a channel they all listen to.
#   * Three connections, each read by one thread: the writer (commands), the
#     reader (XREAD) and the listener (SUBSCRIBE). None is used while the
#     room's lock is held: the room puts its events in a bounded outbox, as
#     it does for a client, and the thread that queued them sends them on
#     the writer's connection once it has let go of the lock, as far as the
#     socket takes them without waiting (send_outbox()). The writer reads
#     Redis's answers, and sends the rest if Redis is slow.
#   * A link lost (or silent for REDIS_SILENCE_SECONDS) is a split: each
#     server's room goes on with its own students until the link is back.
#   * Redis restarted, empty (a new run_id): the servers claim their names
#     again, and put back quiet mode and their mutes.
#
# Keys, for a room called ROOM: ROOM:events (the stream), ROOM:name:KEY (who
# holds a name), ROOM:looks:KIND:LOOK (a joining name's looks, a moment),
# ROOM:server:ID (a heartbeat), ROOM:lesson (alive while any server is),
# ROOM:reaped:ID:KEY (a dead server's leave announced), ROOM:quiet (set in
# quiet mode), ROOM:muted (the muted names), and the channels ROOM:to:ID
# (one per server) and ROOM:to:all.

# Fixed numbers of the link (tests shorten the timings: see RedisLink).
REDIS_PORT = 6379  # Redis's own default port, when --redis gives none
REDIS_ROOM = "chat"  # the room name when --redis gives none
REDIS_SILENCE_SECONDS = 2.0  # no answer for this long: the link is down (a split)
REDIS_CHANNEL_SILENCE_SECONDS = 30.0  # the listener's channel is given up only after
#   this long without a word: a new subscription loses what Redis already sent into
#   the old one, and a slow Redis or a stalled network sends it when it comes back
REDIS_BLOCK_MILLISECONDS = 500  # how long one XREAD waits for new events
REDIS_RETRY_FIRST_SECONDS = 0.1  # the first wait before reconnecting...
REDIS_RETRY_MAX_SECONDS = 2.0  # ...doubling up to this: "a few seconds at most"
REDIS_HEARTBEAT_SECONDS = 1.0  # heartbeat and name refresh, this often
REDIS_HEARTBEAT_TTL_SECONDS = 10  # a heartbeat lasts this long; missing for as
#                                    long again, its server is dead
REDIS_NAME_TTL_SECONDS = 60  # longer than a heartbeat: the reaper, not expiry, frees names
REDIS_LESSON_GAP_SECONDS = 300  # a room no server has beaten in for this long (or
#                                 whose last server stopped) begins a new lesson
REDIS_STREAM_EVENTS = 10000  # events kept in the stream (XADD MAXLEN ~)
REDIS_WORK_ITEMS = 10000  # work queued for Redis; full means Redis is too slow
REDIS_READ_EVENTS = 100  # events taken in one XREAD (each at most ~20 KB)
# Sent by the students' threads, not yet answered: past this many, the writer
# sends the rest, in pipelines, between its heartbeats (a slow link to Redis
# must not hold those back: the other servers would take us for dead).
REDIS_IN_FLIGHT = 100
REDIS_MAX_BULK_BYTES = 1024 * 1024  # the longest string we accept from Redis
REDIS_MAX_ARRAY_ITEMS = 100000  # the most items in one array from Redis
REDIS_MAX_REPLY_BYTES = 8 * 1024 * 1024  # the longest reply we buffer
REDIS_MAX_DEPTH = 8  # arrays in arrays; XREAD's reply is 5 deep
REDIS_CLAIM_GRACE_SECONDS = 5.0  # a claimed name not joined by then is freed
REDIS_MISSED_SECONDS = 600  # whispers (ours, and those to us) remembered this long...
REDIS_MISSED_WHISPERS = 10000  # ...and this many at most (a few MB): to own up to one
#   that a split lost (see RedisLink._read_skipped())
REDIS_LOOKS_SECONDS = 5  # a joining name's looks are held this long: by then its join
#   has come through the stream to every server, and each refuses a look-alike itself
REDIS_UNHEARD_SECONDS = 10.0  # a whisper no server heard is sent again this long: a
# listener that reconnects (backing off up to REDIS_RETRY_MAX_SECONDS) hears it
ROOMS_NAMED = 5  # a server alone in its room names this many rooms others are in
# Messages in one "say" event: a sender's batch is the lines of one read
# (see more_messages()), and each line takes at least one byte.
REDIS_MAX_EVENT_TEXTS = 2 * RECV_BYTES
# A text from another server may be longer than our --max-line (it may have
# been started with a larger one), up to this; an event's texts together, up
# to twice that: less than an outbox (--sendq), so that no event alone can
# have a class dropped as too slow.
REDIS_TEXT_BYTES = 64 * 1024
# Deletes a name key only if this server holds it (ARGV[1]: our id); the
# value is JSON (see RedisLink._name_value), and a bad one is left alone.
RELEASE_IF_OURS_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ok, holder = pcall(cjson.decode, value)
if ok and type(holder) == 'table' and holder.server == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# The reaper's: frees a dead server's name (ARGV[1]: its id) if it still
# holds it, and returns 1 to the one server that is to announce the leave.
# A name no one holds (Redis restarted and forgot it) goes to the first to
# ask: KEYS[2] notes, for ARGV[2] seconds, that the leave has been taken.
REAP_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then
  if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 1 end
  return 0
end
local ok, holder = pcall(cjson.decode, value)
if ok and type(holder) == 'table' and holder.server == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
SERVER_ID = re.compile(r"(?:[a-z0-9][a-z0-9-]{0,40}-)?[0-9a-f]{8,32}")  # see server_id()
RESP_INTEGER = re.compile(rb"-?[0-9]{1,19}")
STREAM_ID = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")


class RedisError(Exception):
    """An error reply from Redis; its message is Redis's own."""


class RedisProtocolError(ConnectionError):
    """Redis sent what is not RESP, or more than we accept: drop the connection."""


class RedisStartError(Exception):
    """The link could not be made at start: one line for the teacher, exit 2."""


class BadEvent(ValueError):
    """An event from Redis that fails a check: logged and dropped."""


INCOMPLETE = object()  # RespParser: the buffer holds no whole reply yet


def encode_command(*args):
    """A Redis command as RESP: an array of bulk strings.

    Each argument is sent as length-prefixed data, so nothing inside it (a
    student's text full of CR LF and '*3') can ever be read as a command.
    """
    parts = [b"*", str(len(args)).encode("ascii"), b"\r\n"]
    for arg in args:
        data = as_bytes(arg)
        parts += [b"$", str(len(data)).encode("ascii"), b"\r\n", data, b"\r\n"]
    return b"".join(parts)


def as_bytes(arg):
    """One command argument as bytes: text as UTF-8, a number in decimal."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, int):
        return str(arg).encode("ascii")
    return arg.encode("utf-8")


class _Short(Exception):
    """Raised inside RespParser when the buffer ends in the middle of a reply."""


class RespParser:
    """Parses RESP replies from a byte buffer; asks for more bytes when short.

    Simple strings and integers come out as str and int, bulk strings as
    bytes (None for a null), arrays as lists, and error replies as
    RedisError objects (the connection raises them). Every size is capped.
    """

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        """Add bytes read from the socket."""
        self._buffer += data

    def next_reply(self):
        """Take one whole reply from the buffer, or return INCOMPLETE."""
        try:
            reply, end = self._parse(0, 0)
        except _Short:
            if len(self._buffer) > REDIS_MAX_REPLY_BYTES:
                raise RedisProtocolError("a reply longer than %d bytes" % REDIS_MAX_REPLY_BYTES)
            return INCOMPLETE
        del self._buffer[:end]
        return reply

    def _line(self, start):
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            if len(self._buffer) - start > MAX_LINE_BYTES:
                raise RedisProtocolError("a reply line with no end")
            raise _Short()
        return bytes(self._buffer[start:end]), end + 2

    def _count(self, line, limit):
        if not RESP_INTEGER.fullmatch(line):
            raise RedisProtocolError("not a number: %r" % line[:40])
        count = int(line)
        if count < -1 or count > limit:
            raise RedisProtocolError("a size out of bounds: %d" % count)
        return count

    def _parse(self, start, depth):
        if start >= len(self._buffer):
            raise _Short()
        kind = self._buffer[start:start + 1]
        line, position = self._line(start + 1)
        if kind == b"+":
            return line.decode("utf-8", "replace"), position
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace")), position
        if kind == b":":
            if not RESP_INTEGER.fullmatch(line):
                raise RedisProtocolError("not an integer: %r" % line[:40])
            return int(line), position
        if kind == b"$":
            size = self._count(line, REDIS_MAX_BULK_BYTES)
            if size == -1:
                return None, position
            if len(self._buffer) < position + size + 2:
                raise _Short()
            if self._buffer[position + size:position + size + 2] != b"\r\n":
                raise RedisProtocolError("a bulk string without its CR LF")
            return bytes(self._buffer[position:position + size]), position + size + 2
        if kind == b"*":
            count = self._count(line, REDIS_MAX_ARRAY_ITEMS)
            if count == -1:
                return None, position
            if depth >= REDIS_MAX_DEPTH:
                raise RedisProtocolError("arrays nested too deep")
            items = []
            for _ in range(count):
                item, position = self._parse(position, depth + 1)
                items.append(item)
            return items, position
        raise RedisProtocolError("an unknown reply type %r" % kind)


class RedisConnection:
    """One connection to Redis; every wait has a deadline. Not thread-safe:
    each of the link's threads owns its own (the writer shares its sending:
    see RedisLink.send_outbox()).

    The socket never blocks: a wait is a poll with a deadline, so that
    send_now() can hand Redis what its socket takes at once, and no more.
    """

    def __init__(self, url, timeout=REDIS_SILENCE_SECONDS):
        self.url = url
        self.sock = socket.create_connection((url.host, url.port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self._ready = OneSocketSelector()
        self._ready.register(self.sock, selectors.EVENT_READ)
        self.parser = RespParser()
        self._unsent = bytearray()  # commands queued, not yet taken by the socket
        self.last_heard = time.monotonic()  # when Redis last sent us anything
        try:
            if url.password:
                credentials = [url.username, url.password] if url.username else [url.password]
                self.call("AUTH", *credentials)
            self.call("PING")
        except (OSError, RedisError):
            self.close()
            raise

    def queue(self, commands):
        """Put commands (tuples of arguments) after those not yet sent."""
        self._unsent += b"".join(encode_command(*command) for command in commands)

    def send_now(self):
        """Send what is queued as far as the socket takes it now; never wait.
        True if all of it went."""
        if self._unsent:
            try:
                sent = self.sock.send(self._unsent)
            except BlockingIOError:
                return False
            del self._unsent[:sent]  # (a bytearray drops its head without copying the rest)
        return not self._unsent

    def send(self, commands, timeout=REDIS_SILENCE_SECONDS):
        """Send what is queued, then commands, in one write when it fits (a
        pipeline); socket.timeout if Redis has not taken it all in timeout seconds."""
        self.queue(commands)
        deadline = time.monotonic() + timeout
        while not self.send_now():
            # A Redis that takes nothing, or too little, is stuck.
            if not self._wait(selectors.EVENT_WRITE, deadline - time.monotonic()):
                raise socket.timeout("Redis did not take our commands within %.1f s" % timeout)

    def read(self, timeout=REDIS_SILENCE_SECONDS):
        """Read one reply; socket.timeout if none comes within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.parser.next_reply()
            if reply is not INCOMPLETE:
                return reply
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                if not self._wait(selectors.EVENT_READ, deadline - time.monotonic()):
                    raise socket.timeout("Redis did not answer within %.1f s" % timeout)
                continue
            if not data:
                raise ConnectionError("Redis closed the connection")
            self.last_heard = time.monotonic()
            self.parser.feed(data)

    def _wait(self, event, timeout):
        """Wait up to timeout seconds for the socket to be readable (or
        writable); False if it is not."""
        if timeout <= 0:
            return False
        self._ready.modify(self.sock, event)
        return bool(self._ready.select(timeout))

    def pipeline(self, commands, timeout=REDIS_SILENCE_SECONDS):
        """Send commands at once and return their replies; raise the first error reply."""
        self.send(commands, timeout)
        replies = [self.read(timeout) for _ in commands]
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        return replies

    def call(self, *args, timeout=REDIS_SILENCE_SECONDS):
        """Run one command and return its reply."""
        return self.pipeline([args], timeout)[0]

    def close(self):
        self._ready.close()
        try:
            self.sock.close()
        except OSError:
            pass


def set_members(reply):
    """The members of a Redis set (SMEMBERS's reply), as text; none if it is not a list."""
    return {member.decode("utf-8", "replace") for member in reply
            if isinstance(member, bytes)} if isinstance(reply, list) else set()


def stream_entries(reply):
    """[(id, fields)] from an XRANGE-style reply, its shape checked; ids as str."""
    if not isinstance(reply, list):
        raise RedisProtocolError("a stream reply that is not a list")
    entries = []
    for entry in reply:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)
                and STREAM_ID.fullmatch(entry[0])):
            raise RedisProtocolError("a stream entry of the wrong shape")
        entries.append((entry[0].decode("ascii"), entry[1]))
    return entries


def forget_old(recent, seconds, most):
    """Keep in recent, an OrderedDict of key -> (when, ...) oldest first, only
    the entries of the last seconds, and at most the newest most of them."""
    now = time.monotonic()
    while recent and (len(recent) > most or now - next(iter(recent.values()))[0] > seconds):
        recent.popitem(last=False)


def stream_position(entry_id):
    """A stream entry's id ("1700000000000-3") as numbers, to compare with another."""
    milliseconds, number = entry_id.split("-")
    return int(milliseconds), int(number)


def xread_entries(reply):
    """The entries of an XREAD reply for one stream (None: nothing new)."""
    if reply is None:
        return []
    if not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], list)
            and len(reply[0]) == 2):
        raise RedisProtocolError("an XREAD reply of the wrong shape")
    return stream_entries(reply[0][1])


RedisURL = collections.namedtuple("RedisURL", "host port username password room")


def redis_url_flag(text):
    """An argparse type: redis://[:PASSWORD@]HOST[:PORT][/ROOM], checked."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "redis" or not parts.hostname:
        raise argparse.ArgumentTypeError("%r is not redis://[:PASSWORD@]HOST[:PORT][/ROOM]"
                                         % text)
    try:
        port = parts.port or REDIS_PORT
    except ValueError:
        raise argparse.ArgumentTypeError("%r has a bad port" % text)
    if is_ip_address(parts.hostname) and not is_loopback_host(parts.hostname):
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:  # 127.0.0.l: a letter where a digit should be
            raise argparse.ArgumentTypeError(
                "%r is not an address: is a letter standing for a digit?" % parts.hostname)
    room = parts.path.lstrip("/") or REDIS_ROOM
    if not ROOM_NAME.fullmatch(room):
        raise argparse.ArgumentTypeError("the room %r may use only letters, digits, _ . -"
                                         % room)
    if parts.username and parts.password is None:
        # Redis URLs put a user name before the colon, a password after it.
        place = parts.netloc.rpartition("@")[2] + parts.path
        raise argparse.ArgumentTypeError(
            "give the Redis password after a colon: redis://:PASSWORD@%s (a Redis user "
            "without one: redis://USER:@%s)" % (place, place))
    password = urllib.parse.unquote(parts.password or "")
    username = urllib.parse.unquote(parts.username or "")
    if not password and not is_loopback_host(parts.hostname):
        # Anyone on the network could read the room, or write into it.
        raise argparse.ArgumentTypeError(
            "Redis at %s is not on this computer: give its password "
            "(redis://:PASSWORD@%s) or use one on 127.0.0.1" % (parts.hostname, parts.hostname))
    return RedisURL(parts.hostname, port, username, password, room)


def server_id(host_name, port):
    """A new name for this server among the linked ones: where it runs, so that
    a teacher knows which lab is meant, and a random part, new at each start
    (else a server started again would take the place of one it never was)."""
    computer = unicodedata.normalize("NFKD", host_name.split(".")[0]).encode("ascii", "ignore")
    place = re.sub(r"[^a-z0-9]+", "-", computer.decode().lower()).strip("-")[:24] or "server"
    return "%s-%d-%s" % (place, port, os.urandom(4).hex())


def redis_refusal(error):
    """Redis's refusal of our password, said for a teacher (else its own words)."""
    text = str(error)
    if text.startswith("NOAUTH"):
        return "it wants a password (redis://:PASSWORD@HOST, in --redis or CHAT_REDIS)"
    if text.startswith("WRONGPASS"):
        return "the password in the Redis URL is wrong"
    if "without any password configured" in text:
        return "it has no password: leave the password out of the Redis URL"
    if NOT_REDIS in text:
        return "it is a chat server, not Redis: is the port right?"
    return text


def is_loopback_host(host):
    """True for localhost and addresses of this computer's loopback (127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it might resolve anywhere


# Each event kind and its fields: field -> (check, required). The server,
# sequence and kind ("s", "n", "k") are checked for every event.
ROOM_EVENTS = {
    "join": {"name": ("name", True), "again": ("flag", False)},
    "leave": {"name": ("name", True), "reason": ("reason", False), "of": ("server", False)},
    "rename": {"old": ("name", True), "new": ("name", True)},
    "say": {"name": ("name", True), "texts": ("texts", True)},
    "act": {"name": ("name", True), "text": ("text", True)},
    "announce": {"text": ("text", True)},
    "quiet": {"on": ("flag", True)},
    # Not shown: a whisper (number m) went from its server to server "to"
    # just before; that server shows nothing later in the stream before it.
    "mark": {"to": ("server", True), "m": ("sequence", True)},
}
PRIVATE_EVENTS = {  # on a server's own channel, never stored
    "whisper": {"name": ("name", True), "to": ("name", True), "text": ("text", True),
                # Shown after that room event of its server, unless that is in
                # the stream before where we began to read (after_id, at most).
                "after": ("sequence", False), "after_id": ("entry", False)},
    "lost": {"name": ("name", True), "to": ("name", True)},  # a whisper nobody was there for
    "kick": {"name": ("name", True), "reason": ("reason", False)},
    "mute": {"name": ("name", True), "on": ("flag", True),
             "all": ("flag", False)},  # an unmute for every server (unmute_everywhere())
    "reply": {"name": ("name", True), "text": ("text", True)},  # to a /kick or /mute
    "missed": {"m": ("sequence", True)},  # whisper m's mark was read, never the whisper
}


def check_event(data, kinds, max_line):
    """Decode one event (JSON bytes from Redis) and check every field; raise BadEvent."""
    try:
        event = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise BadEvent("not JSON: %s" % error)
    if not isinstance(event, dict):
        raise BadEvent("not a JSON object")
    fields = kinds.get(event.get("k")) if isinstance(event.get("k"), str) else None
    if fields is None:
        raise BadEvent("an unknown kind of event: %r" % (event.get("k"),))
    max_line = max(max_line, REDIS_TEXT_BYTES)  # see REDIS_TEXT_BYTES
    check_field(event, "s", "server", max_line)
    texts = event.get("texts")
    if isinstance(texts, list) and sum(len(text.encode("utf-8", "replace")) for text in texts
                                       if isinstance(text, str)) > 2 * max_line:
        raise BadEvent("texts over %d bytes in all" % (2 * max_line))
    sequence = event.get("n")
    if type(sequence) is not int or sequence < 0:
        raise BadEvent("a bad sequence number")
    for field, (check, required) in fields.items():
        if field in event:
            check_field(event, field, check, max_line)
        elif required:
            raise BadEvent("%s has no %s" % (event["k"], field))
    if any(defuse_server_marker(text) != text for text in student_texts(event)):
        raise BadEvent("a student's text that shows ***")
    if event["k"] == "leave" and "reason" in event:  # dropped, it would keep the
        event["reason"] = defuse_server_marker(event["reason"])  # student listed for good
    return event


def student_texts(event):
    """What a student typed, in a checked event (the teacher's and servers' words, and
    a leave's reason, aside)."""
    kind = event["k"]
    if kind == "say":
        return event["texts"]
    return [event["text"]] if kind in ("act", "whisper") else []


def check_field(event, field, check, max_line):
    """Check one field of an event by its kind of value; raise BadEvent."""
    if field not in event:
        raise BadEvent("no %s" % field)
    value = event[field]
    if check == "flag":
        ok = isinstance(value, bool)
    elif check == "sequence":
        ok = type(value) is int and value >= 0
    elif check == "entry":
        ok = isinstance(value, str) and STREAM_ID.fullmatch(value.encode("ascii", "replace"))
    elif check == "server":
        ok = isinstance(value, str) and SERVER_ID.fullmatch(value) is not None
    elif check == "name":
        ok = (isinstance(value, str) and name_problem(value) is None
              and unicodedata.normalize("NFC", value) == value)
    elif check == "texts":
        ok = (isinstance(value, list) and 0 < len(value) <= REDIS_MAX_EVENT_TEXTS
              and all(is_clean_text(text, max_line) for text in value))
    else:  # "text", or "reason", which may be empty
        ok = is_clean_text(value, max_line, may_be_empty=check == "reason")
    if not ok:
        raise BadEvent("a bad %s: %s" % (field, repr(value)[:80]))


def event_origin(data):
    """(server, sequence) of an event that failed check_event(), if it says so."""
    try:
        event = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    server, sequence = event.get("s"), event.get("n")
    if isinstance(server, str) and SERVER_ID.fullmatch(server) and type(sequence) is int \
            and sequence >= 0:
        return server, sequence
    return None


def is_clean_text(text, max_line, may_be_empty=False):
    """True if text is what a server could let a student send (at most max_line bytes)."""
    if not isinstance(text, str) or not (text.strip() or may_be_empty):
        return False
    data = text.encode("utf-8", "replace")
    return len(data) <= max_line and clean_line(data) == text


def is_notice(event):
    """True for a join, leave or rename: lines the room may send a little later."""
    return event["k"] in ("join", "leave", "rename")


SPLIT_LINE = ("*** The other servers are out of reach: for now this room has only "
              "the students on this server.")
WHOLE_LINE = "*** The other servers are back: the room is whole again."

RemoteStudent = collections.namedtuple("RemoteStudent", "name server")


class RedisLink:
    """Links this server's room to the others on one Redis: see the section's top.

    The timings are class attributes, so that tests can shorten them.
    """

    silence_seconds = REDIS_SILENCE_SECONDS
    channel_silence_seconds = REDIS_CHANNEL_SILENCE_SECONDS
    block_milliseconds = REDIS_BLOCK_MILLISECONDS
    retry_first_seconds = REDIS_RETRY_FIRST_SECONDS
    retry_max_seconds = REDIS_RETRY_MAX_SECONDS
    heartbeat_seconds = REDIS_HEARTBEAT_SECONDS
    heartbeat_ttl_seconds = REDIS_HEARTBEAT_TTL_SECONDS
    name_ttl_seconds = REDIS_NAME_TTL_SECONDS
    looks_seconds = REDIS_LOOKS_SECONDS
    work_items = REDIS_WORK_ITEMS

    def __init__(self, room, url):
        self.room = room
        self.url = url
        self.server_id = server_id(socket.gethostname(), room.server_address[1])
        prefix = url.room + ":"
        self.stream = prefix + "events"
        self.channel = prefix + "to:" + self.server_id
        self.all_channel = prefix + "to:all"  # every server listens here too
        self._name_prefix = prefix + "name:"
        self._server_prefix = prefix + "server:"
        self._looks_prefix = prefix + "looks:"  # looks_of() of a name joining now
        self._reaped_prefix = prefix + "reaped:"  # a dead server's leaves announced (_reap())
        self._quiet_key = prefix + "quiet"
        self._muted_key = prefix + "muted"  # a set of the name keys muted anywhere
        self._unmuted_key = prefix + "unmuted"  # ...and of those unmuted since (_relink())
        self._lesson_key = prefix + "lesson"  # kept alive by every server's heartbeat
        # Name keys muted in Redis, as this server last heard (note_muted(),
        # and each claim of a name): a muted student who reconnects to
        # another linked server is muted there too.
        self.muted_keys = set()
        # What this server's teachers want Redis to hold for each name they
        # muted or unmuted; sent as it is when its turn comes, so that work
        # put back after a split cannot swap a mute and an unmute.
        self._mutes_wanted = {}
        # ...and those of them that Redis was seen to hold (SADD answered): if
        # Redis lists one as unmuted at a relink, a teacher elsewhere lifted it
        # while we were cut off, and the unmute sent then never reached us.
        self._mutes_stored = set()
        # Guarded by the room's lock (the link is part of the room), but for
        # _outbox (appended and taken from its left without our locks; put
        # back at its left only with _send_lock held) and _wake:
        self.linked = True  # False during a split
        self._next_sequence = 0
        self._pending = {}  # sequence -> (lines, exclude, notice, event): sent, not yet back
        # Newcomers whose welcome counted our events up to a sequence (the
        # list of who is online has them): each is not told of those again.
        self._welcomed = {}  # client -> the last sequence stamped before it joined
        # All that goes to Redis on the writer's connection, in order: our
        # room events and private messages as they were stamped (the others
        # skip one that comes after a later one), claims behind the leave of
        # the same name. Sent by the thread that queued it once it has let
        # go of the room's lock (send_outbox()), or by the writer. A deque:
        # its appends and pops are thread-safe, so the room never waits here.
        self._outbox = collections.deque()
        self._wake = threading.Event()  # set: the writer has sending or reading to do
        self._last_seen = {}  # server id -> highest sequence shown or skipped
        self._last_event = 0  # the number of the last room event we sent
        # Whispers waiting for the room events their sender sent before them
        # (see hold_private()): (server, sequence, deadline, [(client, line)],
        # the whisper from another server, or None).
        self._held = []
        self._remote_at_split = {}  # the students elsewhere when the last split began
        self._renames_untold = []  # see _rename_taken()
        self._left_apart = {}  # key -> name: our students who left during a split
        self._renamed_apart = {}  # key now -> name before the split: renamed during it
        self._unmutes_apart = set()  # names unmuted here during a split
        self._answers_apart = []  # (student, answer) to other servers' messages, split
        # The highest number of a private message from each server that the
        # listener has acted on; the reader waits on it at a mark (see apply()).
        self._private_seen = {}
        self._private_came = threading.Condition()
        # server id -> _private_seen when a wait at its mark ran out: its next
        # marks are not waited for until something new comes from it.
        self._waited_in_vain = {}
        # (server, sequence) -> when: the private messages acted on lately, to
        # find, at a relink, whispers whose marks the split hid (_report_missed()).
        self._private_got = collections.OrderedDict()
        # Whispers sent lately: sequence -> (when, event), to own up to one
        # the other server says it missed.
        self._whispers_sent = collections.OrderedDict()
        self._quiet_set_alone = False  # the teacher here set quiet mode during a split
        self._quiet_waiting = None  # the number of the last quiet event sent
        # Owned by the reader thread:
        self._last_id = "0"  # the last stream entry read
        self._read_from = (0, 0)  # where it began, at the start or a relink (room's lock)
        self._resume_id = None  # set at a relink: where the reader goes on from
        # Owned by the writer thread:
        self._missed_marks = []  # (server, sequence) found at the relink: see _relink()
        self._missed_due = 0.0  # ...reported as missed from then, if still missing
        self._claimed = {}  # name key this server holds in Redis -> when claimed
        # Private messages no server heard: sent again at each beat (_send_lock
        # held; any sending thread adds to it, the listener reads it).
        self._unheard = []
        self._run_id = None  # Redis's run_id when we last asked: see _redis_restarted()
        self._restart_unsettled = False  # ...it changed, and we have not yet relinked
        self._last_added = (0, None)  # (number, stream id) of our last event in the stream
        # The writer's last heartbeat (or connect), by both clocks: a
        # computer's sleep stops time.monotonic() on Linux and macOS.
        self._last_beat = time.monotonic(), time.time()
        self._missing_since = {}  # server id -> when its heartbeat was first missed
        self._listener = None  # the listener's first connection, made by connect()
        # Held to write on the writer's connection: by the writer, or by a
        # thread sending the outbox, which never waits for it (and reads the
        # writer's _last_added then). It guards:
        self._send_lock = threading.Lock()
        self._redis = None  # the writer's RedisConnection (None: reconnecting)
        # (item, its commands) sent, in order, answers not yet read: appended
        # under _send_lock, taken from the left by the writer alone.
        self._in_flight = collections.deque()
        self._stopping = threading.Event()
        self._threads = []

    # -- Starting and stopping --

    def connect(self):
        """Connect, load the others' students and recent history; raise RedisStartError."""
        where = format_address((self.url.host, self.url.port))
        try:
            self._redis = RedisConnection(self.url, self.silence_seconds)
            self._redis_restarted()  # notes which start of Redis this is
            # Before our heartbeat. A server split from Redis, or stood still,
            # has no heartbeat for a while: the lesson key outlives it.
            servers = self._scan(self._server_prefix + "*")
            fresh = not servers and self._redis.call("EXISTS", self._lesson_key) == 0
            if fresh:
                # No server is linked, nor was lately: a new lesson. What an
                # earlier class said, its quiet mode and mutes are not for
                # this one (Redis may keep them for days: Debian's saves them).
                self._redis.pipeline([("XTRIM", self.stream, "MAXLEN", 0),
                                       ("DEL", self._quiet_key), ("DEL", self._muted_key),
                                       ("DEL", self._unmuted_key)])
            # The stream's end first, then the names: a student who joins in
            # between is in the roster and in the stream; a join read twice
            # is shown once, a join missed would leave them unknown.
            history, self._last_id = self._load_history()
            self._read_from = stream_position(self._last_id if "-" in self._last_id
                                              else "0-0")
            remote = self._load_roster()
            quiet = self._redis.call("EXISTS", self._quiet_key) == 1
            # A room alone may be a typo: the rooms other servers are in.
            rooms = [] if servers else sorted(
                {room for room in (key.decode("ascii", "replace").rpartition(":server:")[0]
                                   for key in self._scan("*:server:*"))
                 if ROOM_NAME.fullmatch(room)})[:ROOMS_NAMED]
            # Subscribed before anyone can join: a whisper to them is heard.
            self._listener = self._subscribe()
            self._redis.pipeline(self._heartbeat_commands())
        except RedisError as error:
            self._close_redis()
            raise RedisStartError("Redis at %s refused us: %s" % (where, redis_refusal(error)))
        except RedisProtocolError as error:
            self._close_redis()
            raise RedisStartError("What answers at %s is not Redis (%s): is the port right?"
                                  % (where, error))
        except OSError as error:
            self._close_redis()
            raise RedisStartError("Cannot reach Redis at %s: %s. Is redis-server running?"
                                  % (where, getattr(error, "strerror", None) or error))
        with self.room._lock:
            self._set_remote(remote)
            self.room._history.extend(history)
            self.room._quiet = quiet
        # Two lines, so that the banner fits an 80-column terminal.
        log.info("Linked through Redis at %s, room %s.", where, self.url.room)
        log.info("This server's name among the linked ones: %s.", self.server_id)
        if servers:
            log.info("In the room already: %s, with %s.", plural(len(servers), "other server"),
                     plural(len(remote), "student"))
        else:
            log.info("No other server is in room %s yet.%s", self.url.room,
                     " Other rooms on this Redis: %s." % ", ".join(rooms) if rooms else "")
        if fresh:
            log.info("The first server in the room: a new lesson (earlier chat let go).")

    def start(self):
        """Start the writer, reader and listener threads."""
        for target in (self._run_writer, self._run_reader, self._run_listener):
            thread = threading.Thread(target=target, daemon=True,
                                      name="redis " + target.__name__[5:])
            self._threads.append(thread)
            thread.start()

    def unlink(self):
        """At shutdown (room's lock held): take no more events, and show here
        what is still on its way through Redis (the other servers may or may
        not get it). Return the leaves for close(), or None during a split."""
        self.stop()  # now: the writer would take the unlinking for a split, and relink
        if not self.linked:
            return None
        self.linked = False
        self._show_pending()
        self._release_held(everything=True)
        return [self._stamp({"k": "leave", "name": client.name})
                for client in self.room._joined.values()]

    def close(self, leaves):
        """At shutdown, after unlink(): the other servers see this server's students leave."""
        if leaves is None:
            return
        names = [leave["name"] for leave in leaves]
        try:  # on a connection of its own: the writer's may be busy or stuck
            connection = RedisConnection(self.url, SHUTDOWN_GRACE_SECONDS)
            commands = [self._xadd(leave) for leave in leaves]
            commands += [("EVAL", RELEASE_IF_OURS_SCRIPT, 1, self._name_prefix + fold_name(name),
                          self.server_id) for name in names]
            commands.append(("DEL", self._server_prefix + self.server_id))
            connection.pipeline(commands, SHUTDOWN_GRACE_SECONDS)
            if not self._scan(self._server_prefix + "*", connection):
                connection.call("DEL", self._lesson_key)  # the last one: the lesson is over
            connection.close()
        except (OSError, RedisError) as error:
            log.warning("Could not tell the other servers we are stopping: %s", error)

    def stop(self):
        """Stop the link's threads (they are daemons: nothing waits for them)."""
        self._stopping.set()
        with self._private_came:
            self._private_came.notify_all()  # a reader waiting at a mark

    # -- The room's hooks: takes() and publish_private() are called with the
    # room's lock held, and never wait; claim_name() is called without it --

    def takes(self, event, lines, exclude):
        """Send a room event through Redis; False if the room must show it itself now.

        The event is shown (to exclude's room too) when it comes back from the
        stream, so every server shows it in the stream's one order.
        """
        if not self.linked:
            if event["k"] == "quiet":
                self._quiet_set_alone = True  # see _settle_quiet()
            self._note_apart(event)
            return False
        if self._outbox_full():  # Redis takes less than we send: as good as gone
            # Split here, so that what is pending is shown before this event;
            # then it is an event of the split (a /quiet is noted so).
            self._split_locked("Redis is too slow: the queue to it is full")
            return self.takes(event, lines, exclude)
        stamped = self._stamp(event)
        if event["k"] == "quiet":
            self._quiet_waiting = stamped["n"]  # see _split_locked()
        self._outbox.append(("event", stamped))  # sent by the caller: see send_outbox()
        self._pending[stamped["n"]] = (lines, exclude, is_notice(event), stamped)
        self._last_event = stamped["n"]
        return True

    def _note_apart(self, event):
        """A leave or rename during a split: the others are told at the relink
        (room's lock held). A student renamed during the split is known to them
        by the name they had before it."""
        if event["k"] == "rename":
            first = self._renamed_apart.pop(fold_name(event["old"]), event["old"])
            self._renamed_apart[fold_name(event["new"])] = first
        elif event["k"] == "leave" and "of" not in event:
            name = self._renamed_apart.pop(fold_name(event["name"]), event["name"])
            self._left_apart[fold_name(name)] = name

    def publish_private(self, student, event):
        """Queue a whisper, /kick or /mute for the server of a student elsewhere
        (or an answer to one: see _act_on_private())."""
        if not self.linked and event["k"] in ("lost", "reply") and \
                len(self._answers_apart) < REDIS_WORK_ITEMS:
            # The listener heard a message before the writer relinked: the
            # answer goes at the relink (its asker is still waiting for it).
            self._answers_apart.append((student, event))
        if not self.linked:
            return
        channel = self.url.room + ":to:" + student.server
        if event["k"] != "whisper":
            self._queue_out(("publish", channel, self._stamp(event)))
            return
        event = self._stamp(dict(event, after=self._last_event))
        # With a mark right after it in the stream, so that no later line of
        # its sender overtakes it. Sent by the caller: see send_outbox().
        if self._queue_out(("publish", channel, event), ("event", self._stamp(
                {"k": "mark", "to": student.server, "m": event["n"]})), wake=False):
            self._whispers_sent[event["n"]] = time.monotonic(), event, student.server
            forget_old(self._whispers_sent, REDIS_MISSED_SECONDS, REDIS_MISSED_WHISPERS)

    def hold_private(self, lines, server=None, after=None, whisper=None):
        """Hold whisper lines until the room events sent before them are shown.

        A whisper goes by pub/sub and a room event by the stream, so a
        whisper sent after a chat line could overtake it, on any server: its
        lines wait here until the stream has brought that server's events up
        to after (by default: ours, up to now). lines: [(client, line)].
        whisper: the event, if from another server (its sender is told if the
        student leaves meanwhile). Room's lock held. False if nothing is on
        its way: show them now.
        """
        server = server or self.server_id
        after = self._last_event if after is None else after
        if not self.linked or self._last_seen.get(server, 0) >= after:
            return False
        deadline = time.monotonic() + self.silence_seconds  # the event may never come
        self._held.append((server, after, deadline, lines, whisper))
        return True

    def _tell_lost(self, whisper):
        """A whisper from another server found no one here: its sender is told (lock held)."""
        self.publish_private(RemoteStudent(whisper["to"], whisper["s"]),
                          {"k": "lost", "name": whisper["name"], "to": whisper["to"]})

    def _release_late(self):
        """Show held whisper lines whose room event never came (its server split)."""
        with self.room._lock:
            released = self._release_held() if self._held else []
        self.room._send_queued(released)

    def _release_held(self, everything=False):
        """Queue the held whisper lines that may go now; return their clients (lock held)."""
        now, released, still = time.monotonic(), [], []
        for held in self._held:
            server, after, deadline, lines, whisper = held
            if everything or now >= deadline or self._last_seen.get(server, 0) >= after:
                for client, line in lines:
                    if self.room._joined.get(client.key) is client:  # not gone meanwhile
                        self.room._queue_for(client, line)
                        released.append(client)
                    elif whisper is not None:
                        self._tell_lost(whisper)
            else:
                still.append(held)
        self._held = still
        return released

    def claim_name(self, name, key, own=None):
        """Claim a name in Redis before a join or rename; return why not, or None.

        Called without the room's lock: it waits for the writer's answer.
        own: the key of the student renaming (None for a join).
        """
        with self.room._lock:
            holder = self.room._remote.get(key)
            if holder is not None:
                return NAME_TAKEN % holder.name
            if not self.linked or key in self.room._joined:
                return None  # a split, or taken here: the room's own check says so
        answer = queue.Queue(1)
        self._queue_out(("claim", key, name, answer, own))
        try:
            claimed = answer.get(timeout=self.silence_seconds + 1)
        except queue.Empty:
            return None  # Redis is stuck: a split comes; the room decides alone
        if claimed is True or claimed is None:  # None: a split; the room decides alone
            return None
        return claimed  # why not, with the name as its holder wrote it

    def out_of_reach(self, key):
        """True if key was a student on another server when this split began
        (room's lock held)."""
        return not self.linked and key in self._remote_at_split

    def muted_anywhere(self):
        """The name keys muted on any server, as Redis holds them; None during
        a split. Called without the room's lock: it waits for the writer."""
        if not self.linked:
            return None
        answer = queue.Queue(1)
        self._queue_out(("muted", answer))
        try:
            return answer.get(timeout=self.silence_seconds + 1)
        except queue.Empty:
            return None

    def unmute_everywhere(self, name):
        """Tell every server to forget its mutes of name, whoever holds one.

        A server keeps the mute it set at another's /mute (by address), also
        for a student who has since moved on: an /unmute typed anywhere lifts it.
        """
        with self.room._lock:  # the link numbers what it sends under the room's lock
            if self.linked:
                self._send_unmute_to_all(name)
            else:
                self._unmutes_apart.add(name)  # sent at the relink

    def _send_unmute_to_all(self, name):
        """Queue the unmute of name for every server (room's lock held)."""
        self._queue_out(("publish", self.all_channel, self._stamp(
            {"k": "mute", "name": name, "on": False, "all": True})))

    def note_muted(self, key, muted):
        """A student of ours was muted or unmuted: so they stay on any server
        (room's lock held: _put_back_room_state() reads _mutes_wanted under it)."""
        if muted:
            self.muted_keys.add(key)
        else:
            self.muted_keys.discard(key)
        self._mutes_wanted[key] = muted
        self._mutes_stored.discard(key)  # until Redis answers the SADD (_answered())
        self._queue_out(("mute", key))

    def _queue_out(self, *items, wake=True):
        """Queue work for Redis (stamped items: room's lock held), and wake the
        writer to send it, unless the caller calls send_outbox(). False if
        dropped: when Redis takes less than we send, a private message is
        dropped (the room's next event splits it: see takes()); the rest is
        small, and queued all the same, behind what waits.
        """
        if items[0][0] == "publish" and self._outbox_full():
            self._note_console("Redis is too slow: the queue to it is full")
            return False
        self._outbox.extend(items)
        if wake:
            self._wake.set()
        return True

    def _outbox_full(self):
        """Is what waits for Redis's answer (in the outbox, or sent) too much?"""
        return len(self._outbox) + len(self._in_flight) >= self.work_items

    def _note_console(self, text):
        """Tell the console, after the room events queued so far (safe under the lock)."""
        self.room.recorder.note("console", text)

    def _stamp(self, event):
        """Add this server's id and the next sequence number (room's lock held).

        Other servers show a server's events in the order of these numbers,
        and skip a number they have seen: numbered without the lock, two
        threads could give out one number twice, and a chat line be lost.
        """
        self._next_sequence += 1
        return dict(event, s=self.server_id, n=self._next_sequence)

    def _xadd(self, event):
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return ("XADD", self.stream, "MAXLEN", "~", REDIS_STREAM_EVENTS, "*", "e", data)

    # -- The writer thread: XADD, claims, heartbeat, reaping dead servers --

    def _run_writer(self):
        next_beat, failing_since, delay = 0.0, None, self.retry_first_seconds
        while not self._stopping.is_set():
            try:
                if self._redis is None:
                    with self._send_lock:
                        self._reconnect()
                    failing_since, delay = None, self.retry_first_seconds
                else:  # wait for work, or for the next heartbeat
                    self._wake.wait(max(0.0, next_beat - time.monotonic()))
                    self._wake.clear()  # before looking: what is queued after wakes it again
                if not self.linked:
                    # Split by the reader, or by a full outbox: start afresh.
                    raise socket.timeout("the link was split")
                self._check_not_paused()  # before anything queued while it stood still goes out
                if time.monotonic() >= next_beat:
                    with self._send_lock:  # no one sends: the answers are the beat's
                        self._read_answers(self._finish_sending())
                        self._beat()
                        self._send_unheard_again()
                        self._report_missed()
                    next_beat = time.monotonic() + self.heartbeat_seconds
                self._send_work(next_beat)
            except (OSError, RedisError) as error:
                # A dropped connection that comes back at once is no split:
                # what was in flight is sent again (read twice, shown once).
                # Silence, or a link down for long, is.
                failing_since = failing_since or time.monotonic()
                with self._send_lock:
                    self._close_redis()
                if isinstance(error, (socket.timeout, RedisError)) or \
                        time.monotonic() - failing_since > self.silence_seconds:
                    self.split(error)
                    self._forget_in_flight()
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, self.retry_max_seconds)
            except Exception as error:  # a thread's top level: log it, go on
                if self._stopping.is_set():
                    break
                log.error("Redis writer: %r", error)
                with self._send_lock:
                    self._close_redis()
                self.split(error)
                self._forget_in_flight()

    def _reconnect(self):
        """Connect the writer, and relink if we were split (_send_lock held)."""
        self._redis = RedisConnection(self.url, self.silence_seconds)
        self._last_beat = time.monotonic(), time.time()
        if self._redis_restarted():
            self._restart_unsettled = True  # until all below is done
            self._send_forgotten_again()
        if not self.linked:
            self._relink(self._restart_unsettled)
            self._last_beat = time.monotonic(), time.time()
        if self._restart_unsettled:
            self._put_back_room_state()
            self._restart_unsettled = False

    def _send_forgotten_again(self):
        """Redis started again: send again, ahead of all else, our events it
        had taken (XADD answered) but not yet given back through the stream.
        If it forgot them, they come back so, in their place, to every
        server; if it kept them, each server skips the second copy. (Those
        not answered yet are in the outbox already: _close_redis().)
        _send_lock held."""
        with self.room._lock:
            queued = {item[1]["n"] for item in self._outbox if item[0] == "event"}
            taken = [self._pending[sequence][3] for sequence in sorted(self._pending)
                     if sequence not in queued]
            self._outbox.extendleft(reversed([("event", event) for event in taken]))

    def _redis_restarted(self):
        """True if Redis started again since we last asked (writer's connection).

        Redis gives itself a new run_id at each start. Unless it saved them,
        it forgot every key: the names come back by the heartbeat (_beat()),
        and quiet mode and mutes by _put_back_room_state(). A restart of
        under a second is no split, so nothing else would notice.
        """
        try:
            info = self._redis.call("INFO", "server")
        except RedisError:  # INFO may be refused to our user: restarts go unseen
            return False
        match = re.search(rb"\brun_id:(\w+)", info) if isinstance(info, bytes) else None
        run_id, self._run_id = self._run_id, match.group(1) if match else None
        return run_id is not None and self._run_id != run_id

    def _put_back_room_state(self):
        """Tell a restarted Redis the room's quiet mode, and the mutes this server holds.

        Servers that start later read them there; those linked now hold them already.
        """
        with self.room._lock:
            quiet = self.room._quiet
            muted = sorted(key for key, muted in self._mutes_wanted.items() if muted)
        # The heartbeats first: a server that starts now and finds none
        # would take this for a new lesson, and clear the rest again.
        commands = self._heartbeat_commands()
        if quiet:
            commands.append(("SET", self._quiet_key, "1"))
        if muted:
            commands.append(("SADD", self._muted_key, *muted))
        self._redis.pipeline(commands, self.silence_seconds)
        log.info("Redis started again: put back %s%s", "quiet mode and " if quiet else "",
                 plural(len(muted), "mute"))

    def _close_redis(self):
        """Close the writer's connection: what was in flight goes again on the
        next, before anything queued since (_send_lock held, or no other
        thread started yet)."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self._outbox.extendleft(reversed([item for item, _ in self._in_flight]))
        self._in_flight.clear()

    # -- Sending: the outbox by the thread that filled it, the rest by the writer --

    def send_outbox(self):
        """Send what waits in the outbox to Redis, as far as the writer's
        socket takes it now; never wait. The writer reads the answers.

        The room calls it whenever it has let go of its lock with something
        sent (ChatRoom._send_queued()), as it calls Client.flush(): the thread
        that queued a room event sends it, and the hop to Redis waits for no
        other thread to wake. Whoever holds _send_lock sends for everyone; at
        most REDIS_IN_FLIGHT wait for their answers, the rest for the writer.
        """
        while self._outbox and not self._stopping.is_set():
            if not self._send_lock.acquire(blocking=False):
                return  # the holder sends it, or the writer after it
            try:
                if self._redis is None or self._stood_still() or \
                        len(self._in_flight) >= REDIS_IN_FLIGHT:
                    return  # reconnecting, or a split to declare, or Redis is slow
                self._queue_commands(self._outbox)
                if not self._redis.send_now():
                    return  # the socket is full: the writer waits for it
            except OSError:
                return  # the connection broke: the writer reconnects, and sends it again
            finally:
                self._send_lock.release()
                self._wake.set()  # the writer reads the answers (and sends the rest)

    def _queue_commands(self, items, most=REDIS_READ_EVENTS):
        """Queue on the writer's connection the commands for up to most of
        items (a deque, taken from the left) (_send_lock held).

        A private message to a server that has one held (unheard) waits
        behind it, once the writer has read that one's answer: the teacher's
        /mute then /unmute must not swap places.
        """
        held = {item[1] for item in self._unheard}
        for _ in range(most):
            try:
                item = items.popleft()
            except IndexError:  # no more (or a split took them: _drain_work())
                break
            if item[0] == "publish" and item[1] in held and len(item) == 3:
                self._hold_unheard(item)
                continue
            commands = self._commands_for(item)
            self._redis.queue(commands)
            self._in_flight.append((item, commands))

    def _send_work(self, until):
        """The writer's turn: send what waits in the outbox (as it is now), in
        pipelines, waiting if Redis is slow, and read the answers; stop when
        the heartbeat is due (at time.monotonic() until)."""
        for _ in range(max(1, -(-len(self._outbox) // REDIS_READ_EVENTS))):
            with self._send_lock:
                self._queue_commands(self._outbox)
                sent = self._finish_sending()  # and what send_outbox() could not
            self._read_answers(sent)  # students' threads may send meanwhile
            if time.monotonic() >= until:
                break
        if self._in_flight or self._outbox:
            self._wake.set()  # the rest next time round, after the heartbeat if due

    def _finish_sending(self):
        """Send all that is queued on the writer's connection, waiting if Redis is
        slow; return how many in _in_flight now have all their commands sent
        (_send_lock held)."""
        self._redis.send([], self.silence_seconds)
        return len(self._in_flight)

    def _read_answers(self, count):
        """Read Redis's answers for the first count in _in_flight, and act on them.

        Only the writer reads. Unless it holds _send_lock (for a heartbeat),
        the students' threads go on sending meanwhile: their answers come after.
        """
        for _ in range(count):
            item, commands = self._in_flight[0]
            replies = [self._redis.read(self.silence_seconds) for _ in commands]
            for reply in replies:
                if isinstance(reply, RedisError):
                    raise reply
            self._in_flight.popleft()
            self._answered(item, commands, replies)

    def _answered(self, item, commands, replies):
        """Act on Redis's answers to one piece of work."""
        if item[0] == "claim":  # replies: SET's, GET's (who holds it), SISMEMBER's,
            # then SET's and GET's for each look.
            # Ours already: a claim sent again after a reconnect.
            claimed = replies[0] is not None or self._holds(replies[1])
            if replies[2] == 1:
                self.muted_keys.add(item[1])  # before the answer: join() reads it
            else:
                self.muted_keys.discard(item[1])
            looks = replies[3:]
            look_alike = self._look_alike(looks, item[1], item[2], item[4])
            if claimed and look_alike is None:
                self._claimed[item[1]] = time.monotonic()
                item[3].put(True)
                return
            # Refused: what this claim set goes again (a name that was ours
            # already goes when no student here has it: see _beat()).
            releases = [command[1] for command, taken in zip(commands[3::2], looks[0::2])
                        if taken is not None]
            if not claimed:
                item[3].put(NAME_TAKEN % self._holder_name(replies[1], item[2]))
            else:
                if replies[0] is not None:
                    releases.append(self._name_prefix + item[1])
                else:
                    self._claimed[item[1]] = time.monotonic()
                item[3].put(LOOKS_TAKEN % look_alike)
            self._outbox.extend(("release", key) for key in releases)
        elif item[0] == "publish" and replies[0] == 0:
            self._hold_unheard(item)
        elif item[0] == "publish" and len(item) > 3 and item[2]["k"] == "whisper":
            with self.room._lock:  # sent again, and heard at last: no report of
                self._whispers_sent.pop(item[2]["n"], None)  # it missed is true now
        elif item[0] == "muted":
            item[1].put(set_members(replies[0]))
        elif item[0] == "mute":
            with self.room._lock:
                if commands[0][0] == "SADD" and self._mutes_wanted.get(item[1]):
                    self._mutes_stored.add(item[1])
        elif item[0] == "event" and item[1]["k"] != "mark":
            if isinstance(replies[0], bytes):  # XADD's answer: the entry's id
                self._last_added = item[1]["n"], replies[0].decode("ascii")
            if self._freed_key(item[1]):
                self._claimed.pop(self._freed_key(item[1]), None)

    def _hold_unheard(self, item):
        """A private message that no server was listening for: keep it for a while.

        Pub/sub keeps nothing: the other server's listener may be between two
        connections, so the message is sent again at each heartbeat.
        """
        deadline = item[3] if len(item) > 3 else time.monotonic() + REDIS_UNHEARD_SECONDS
        if time.monotonic() < deadline:
            self._unheard.append(item[:3] + (deadline,))
        else:
            self._own_up([item[2]], "did not arrive: their server was not listening")

    def _send_unheard_again(self):
        """Queue the private messages no server heard again, ahead of all that
        waits, in the order they were stamped (_send_lock held): a listener
        drops one older than the last it acted on."""
        unheard = sorted(self._unheard, key=lambda item: item[2]["n"])
        self._unheard = []
        now = time.monotonic()
        late = [item[2] for item in unheard if item[3] <= now]  # held through a split
        self._own_up(late, "did not arrive: their server was not listening")
        self._outbox.extendleft(reversed([item for item in unheard if item[3] > now]))

    def _freed_key(self, event):
        """The name key an event of ours frees in Redis (a leave, a rename), or None."""
        name = self._freed_name(event)
        return None if name is None else fold_name(name)

    @staticmethod
    def _freed_name(event):
        """The name an event of ours lets go of (a leave, a rename), or None."""
        if event["k"] == "leave" and "of" not in event:
            return event["name"]
        if event["k"] == "rename" and fold_name(event["old"]) != fold_name(event["new"]):
            return event["old"]  # not when only the case changed: same key
        return None

    def _looks_keys(self, name):
        """The keys that hold a joining name's looks a moment (see _commands_for())."""
        return ["%s%s:%s" % (self._looks_prefix, kind.replace(" ", "-"), look)
                for kind, look in looks_of(name)]

    def _commands_for(self, item):
        """The Redis commands for one piece of queued work."""
        kind = item[0]
        if kind == "event":
            event = item[1]
            commands = [self._xadd(event)]
            freed = self._freed_key(event)
            if freed is not None:  # the name is free once the XADD is in (if still ours:
                # a leave sent at a relink may find it claimed elsewhere since)
                commands.append(("EVAL", RELEASE_IF_OURS_SCRIPT, 1, self._name_prefix + freed,
                                 self.server_id))
                # ...and its looks, if still held for it: a look-alike may come now.
                commands += [("EVAL", RELEASE_IF_OURS_SCRIPT, 1, key, self.server_id)
                             for key in self._looks_keys(self._freed_name(event))]
            elif event["k"] == "rename":  # a new case, same key: show it as now written
                commands.append(("SET", self._name_prefix + fold_name(event["new"]),
                                 self._name_value(event["new"]), "XX",
                                 "EX", self.name_ttl_seconds))
            elif event["k"] == "quiet":  # for servers that start while it is on
                commands.append(("SET", self._quiet_key, "1") if event["on"]
                                else ("DEL", self._quiet_key))
            return commands
        if kind == "publish":
            event = item[2]
            if event.get("after", 0) and self._last_added[0] >= event["after"]:
                # Where its room event is in the stream, at most (see _act_on_private()).
                event = dict(event, after_id=self._last_added[1])
            return [("PUBLISH", item[1], json.dumps(event, ensure_ascii=False))]
        if kind == "muted":  # the console's /who asks
            return [("SMEMBERS", self._muted_key)]
        if kind == "release":  # a key a refused claim set
            return [("EVAL", RELEASE_IF_OURS_SCRIPT, 1, item[1], self.server_id)]
        if kind == "mute":  # as wanted now, not as when it was queued
            if self._mutes_wanted.get(item[1]):
                return [("SADD", self._muted_key, item[1]), ("SREM", self._unmuted_key, item[1])]
            return [("SREM", self._muted_key, item[1]), ("SADD", self._unmuted_key, item[1])]
        # "claim": the value says which server holds the name; and is it muted?
        # Then its looks, held a moment: a look-alike given on another server
        # at the same time (before either join is back from the stream) is refused.
        commands = [("SET", self._name_prefix + item[1], self._name_value(item[2]),
                     "NX", "EX", self.name_ttl_seconds), ("GET", self._name_prefix + item[1]),
                    ("SISMEMBER", self._muted_key, item[1])]
        for key in self._looks_keys(item[2]):
            commands += [("SET", key, self._name_value(item[2]), "NX", "EX", self.looks_seconds),
                         ("GET", key)]
        return commands

    def _look_alike(self, replies, key, name, own=None):
        """The name a claim's looks are held for, if not name's own (else None).

        replies: SET's and GET's of each look (see _commands_for()). own: the
        key of the student renaming, whose own looks may be held still.
        """
        for taken, value in zip(replies[0::2], replies[1::2]):
            if taken is None:  # held already: by name itself (or the same name
                holder = self._holder_name(value, name)  # in another case)?
                if fold_name(holder) not in (key, own):
                    return holder
        return None

    def _holder_name(self, value, asked):
        """The name as its holder wrote it, from a name key's value (else as asked)."""
        try:
            name = json.loads(value.decode("utf-8"))["name"]
        except (AttributeError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            return asked
        return name if isinstance(name, str) and name_problem(name) is None else asked

    def _name_value(self, name):
        return json.dumps({"name": name, "server": self.server_id}, ensure_ascii=False)

    def _beat(self):
        """Keep our heartbeat and names alive; free names no one here uses; reap."""
        self._check_not_paused()
        with self.room._lock:
            local = set(self.room._joined)
        now = time.monotonic()
        # A claim that never became a join (the join failed after it) is freed
        # after a grace that covers the time between a claim and its join.
        stale = [key for key, since in self._claimed.items()
                 if key not in local and now - since > REDIS_CLAIM_GRACE_SECONDS]
        for key in stale:
            self._release_if_ours(key)
        keys = sorted(self._claimed)
        commands = self._heartbeat_commands()
        commands += [("EXPIRE", self._name_prefix + key, self.name_ttl_seconds) for key in keys]
        # Stamped as sent: a Ctrl+Z while the answer is on its way still counts.
        sent = time.monotonic(), time.time()
        replies = self._redis.pipeline(commands, self.silence_seconds)
        self._last_beat = sent
        lost = [key for key, kept in zip(keys, replies[len(commands) - len(keys):]) if not kept]
        if lost:  # another server thought we were dead and freed these
            log.warning("Redis lost names of ours: claiming them again")
            self._reclaim(lost, rejoin=True)
        self._reap()

    def _heartbeat_commands(self):
        """Keep our heartbeat alive, and the lesson's (see connect())."""
        return [("SET", self._server_prefix + self.server_id, "1",
                 "EX", self.heartbeat_ttl_seconds),
                ("SET", self._lesson_key, "1", "EX", REDIS_LESSON_GAP_SECONDS)]

    def _check_not_paused(self):
        """Split if this server stood still for longer than its heartbeat lasts.

        Suspended (Ctrl+Z at its console, a laptop's lid closed), it may have
        been taken for dead: the others let its students go, and may have
        given one of their names to someone else. Going on as if nothing
        happened, its students' lines would reach servers that no longer
        know them. A split and relink claims their names again (renaming one
        that was taken) and rejoins them.
        """
        still = self._stood_still()
        if still:
            raise socket.timeout("this server stood still for %.0f seconds" % still)

    def _stood_still(self):
        """How long this server stood still, if longer than its heartbeat lasts; else 0."""
        still = max(time.monotonic() - self._last_beat[0], time.time() - self._last_beat[1])
        return still if still > self.heartbeat_ttl_seconds else 0

    def _reap(self):
        """Announce the leave of each student of a server whose heartbeat is long gone."""
        with self.room._lock:
            remote = list(self.room._remote.values())
        servers = sorted({student.server for student in remote})
        if not servers:
            self._missing_since.clear()
            return
        alive = self._redis.pipeline([("EXISTS", self._server_prefix + server)
                                       for server in servers], self.silence_seconds)
        # Dead only once its heartbeat has been missing for as long again as
        # it lasts: after a Redis restart lost every key, a live server may be
        # a few seconds from its next heartbeat (or reconnecting).
        now, dead = time.monotonic(), set()
        for server, exists in zip(servers, alive):
            if exists:
                self._missing_since.pop(server, None)
            elif now - self._missing_since.setdefault(server, now) >= \
                    self.heartbeat_ttl_seconds:
                dead.add(server)
        for server in set(self._missing_since) - set(servers):
            del self._missing_since[server]  # gone from the roster already
        orphans = [student for student in remote if student.server in dead]
        if not orphans:
            return
        # Each name is freed only if the dead server still holds it: a live
        # server may have claimed it since. One that no one holds (Redis
        # restarted) is freed by the first to ask (see REAP_SCRIPT).
        won = self._redis.pipeline(
            [("EVAL", REAP_SCRIPT, 2, self._name_prefix + fold_name(student.name),
              "%s%s:%s" % (self._reaped_prefix, student.server, fold_name(student.name)),
              student.server, self.name_ttl_seconds) for student in orphans],
            self.silence_seconds)
        # NOTE: a name that was not freed here is another server's to announce;
        # its leave comes through the stream like any other.
        with self.room._lock:
            for student, ours in zip(orphans, won):
                if ours:  # only the server whose DEL freed the name tells everyone
                    self._note_console("Server %s is gone: %s leaves"
                                       % (student.server, student.name))
                    self._queue_out(("event", self._stamp(
                        {"k": "leave", "name": student.name, "of": student.server})))

    # -- Splits and relinking --

    def split(self, reason):
        """Go on alone: show pending events here (once), tell the students, forget the others."""
        with self.room._lock:
            self._split_locked(reason)
            recipients = list(self.room._joined.values())
        self._drain_work()
        self.room._send_queued(recipients)

    def _split_locked(self, reason):
        """The room's part of a split (room's lock held); the writer then reconnects."""
        untold, self._renames_untold = self._renames_untold, []  # a relink that failed
        for told in untold:
            self._tell_renamed(*told)
        if not self.linked:
            return
        self.linked = False
        self._note_console("Lost the link to Redis (%s): this room goes on alone" % (reason,))
        if self._quiet_waiting in self._pending:  # shown here only, as if set alone
            self._quiet_set_alone = True
        self._show_pending()
        self._release_held(everything=True)
        self._remote_at_split = dict(self.room._remote)  # see _relink()
        self._set_remote({})
        for client in self.room._joined.values():
            self.room._queue_for(client, SPLIT_LINE)
        self.room.recorder.note("room", SPLIT_LINE)  # the transcript too

    def _show_pending(self):
        """Show here, once, our events that have not come back from Redis (lock held);
        a whisper held for one of them right after it."""
        for sequence in sorted(self._pending):
            self._show_own(sequence)
            self._last_seen[self.server_id] = sequence  # shown
            if self._held:
                self._release_held()
        self._welcomed.clear()

    def welcomed(self, client):
        """A newcomer's welcome counted our events so far (room's lock held)."""
        if self._pending:
            self._welcomed[client] = self._next_sequence

    def _show_own(self, sequence):
        """Show one of our events that was waiting for its turn (room's lock held);
        return who it was queued for.

        A newcomer who joined after it was sent is not told of a join, leave
        or rename again: the list of who is online it was given counted it.
        """
        lines, exclude, notice, _ = self._pending.pop(sequence)
        if not lines:
            return []
        if notice:
            for client, last_counted in self._welcomed.items():
                if last_counted >= sequence and client is not exclude:
                    self.room.notices.skip(client, len(lines))
        return self.room._broadcast(lines, exclude, notice=notice)

    def _drain_work(self):
        """Forget the work queued for Redis after a split: its events were
        shown here already (and what was in flight when the writer's
        connection broke is back in the outbox: _close_redis())."""
        dropped = []
        for _ in range(len(self._outbox)):  # (not what _forget() puts back)
            try:
                dropped.append(self._outbox.popleft())
            except IndexError:  # taken meanwhile by send_outbox()
                break
        self._forget(dropped)

    def _forget_in_flight(self):
        """The writer's part of a split: what it had sent is no more its business
        (_close_redis() put it back in the outbox)."""
        self._drain_work()

    def _forget(self, items):
        """Work lost to a split: answer claims, keep mutes and releases, own up
        to private messages.

        A mute, or the release of a key a refused claim set, goes to Redis
        again after the relink. A whisper, /kick or
        /mute for another server may not have reached it: its sender is told
        (an answer to another server's /kick or /mute was noted here already).
        """
        lost, apart = [], []
        for item in items:
            if item[0] == "event" and item[1]["k"] in ("leave", "rename"):
                apart.append(item[1])  # told again at the relink
            elif item[0] == "claim":
                item[3].put(None)  # no answer: the room decides alone
            elif item[0] == "muted":
                item[1].put(None)
            elif item[0] in ("mute", "release"):
                self._outbox.append(item)  # sent once the link is back
            elif item[0] == "publish":
                lost.append(item[2])
        if apart:
            with self.room._lock:
                for event in apart:
                    self._note_apart(event)
        self._own_up(lost, "may not have arrived: the servers were cut apart")

    def _own_up(self, events, what_happened):
        """Tell the sender of each whisper (the console, for a /kick or /mute) that
        it was lost, or may have been; never with the room's lock held."""
        if not events:
            return
        with self.room._lock:
            recipients = []
            for event in events:
                if event["k"] == "whisper":
                    if event["s"] == self.server_id:  # (a "lost" carries its sender's n)
                        self._whispers_sent.pop(event["n"], None)  # owned up to: once
                    sender = self.room._joined.get(fold_name(event["name"]))
                    if sender is not None:
                        self.room._queue_for(sender, "*** Your whisper to %s %s." % (
                            event["to"], what_happened))
                        recipients.append(sender)
                elif event["k"] not in ("reply", "lost", "missed"):  # answers: noted already
                    command = "unmute" if event["k"] == "mute" and not event["on"] \
                        else event["k"]
                    self._note_console("A /%s for %s %s." % (command, event["name"],
                                                             what_happened))
        self.room._send_queued(recipients)

    def _relink(self, restarted=False):
        """The writer is back after a split: reclaim names, reload the others, rejoin.

        restarted: Redis started again meanwhile (see _redis_restarted()).
        """
        self._forget_in_flight()
        self._missing_since.clear()  # seen while apart: it says nothing now
        with self.room._lock:
            local = set(self.room._joined)
        for key in sorted(set(self._claimed) - local):
            self._release_if_ours(key)  # they left during the split
        self._reclaim(sorted(local))
        newest = stream_entries(self._redis.call("XREVRANGE", self.stream, "+", "-",
                                                  "COUNT", 1))
        # An empty stream that we had read from: Redis forgot the room (it
        # restarted with nothing saved), its quiet mode too, and we are the
        # first server back. (Those back later find events there: see
        # _settle_quiet().)
        forgotten = not newest and self._last_id != "0"
        missed, changed, quiet_told = self._read_skipped(newest[0][0] if newest else None,
                                                         restarted)
        # After a restart, Redis's quiet mode says something only if a server
        # back before us set it since (a server started meanwhile found none).
        forgotten = forgotten or (restarted and not quiet_told)
        remote = self._load_roster()  # after the stream's end: see connect()
        quiet_elsewhere = self._redis.call("EXISTS", self._quiet_key) == 1
        muted_in_redis, unmuted_in_redis = self._redis.pipeline(
            [("SMEMBERS", self._muted_key), ("SMEMBERS", self._unmuted_key)])
        # A look-alike of one of ours that joined elsewhere during the split:
        # ours takes a new name, as with the same name (see _reclaim()).
        looks = {look: key for key, student in remote.items() for look in looks_of(student.name)}
        with self.room._lock:
            rivals = [client for key, client in self.room._joined.items()
                      if any(looks.get(look, key) != key for look in client.looks)]
        for client in rivals:
            self._rename_taken(client, looks_like=True)
        with self.room._lock:
            if self._stopping.is_set():
                return  # the server began to stop meanwhile: it stays unlinked
            self._resume_id = newest[0][0] if newest else "0"
            self._read_from = stream_position(newest[0][0] if newest else "0-0")
            # Our events up to now were shown here at the split: never again.
            self._last_seen[self.server_id] = self._next_sequence
            self.linked = True
            remote = {key: student for key, student in remote.items()
                      if key not in self.room._joined}
            # Who came and went elsewhere while we were apart: the stream's
            # events of the split are never shown here (we go on from its
            # end; _read_skipped() only looks there for a few things).
            before, self._remote_at_split = self._remote_at_split, {}
            if restarted or forgotten:  # Redis holds only the names of the
                # servers back before us: the others' students stay, unannounced,
                # until their server rejoins them, or the reaper finds it gone
                # (see _reap()); unless those servers said since that they left
                # or took another name (changed: see _read_skipped()).
                remote.update((key, student) for key, student in before.items()
                              if key not in remote and key not in self.room._joined
                              and (student.server, key) not in changed)
            news, renamed = [], set()
            for key, student in sorted(before.items()):
                if key in remote:
                    continue
                new_key = fold_name(changed.get((student.server, key)) or "")
                if new_key in remote and new_key not in before and \
                        remote[new_key].server == student.server:  # renamed: told so
                    news += event_lines({"k": "rename", "old": student.name,
                                          "new": remote[new_key].name})
                    renamed.add(new_key)
                else:
                    news += event_lines({"k": "leave", "name": student.name})
            for key, student in sorted(remote.items()):
                was = before.get(key)
                if key in renamed:
                    continue
                if was is None or was.server != student.server:
                    news += event_lines({"k": "join", "name": student.name})
                elif was.name != student.name:  # only the case changed: the same key
                    news += event_lines({"k": "rename", "old": was.name, "new": student.name})
            self._set_remote(remote)
            # Ours who left (or took another name) while we were apart: the
            # others still list them.
            left, self._left_apart = self._left_apart, {}
            for key, name in sorted(left.items()):
                if key not in self.room._joined:
                    self._queue_out(("event", self._stamp({"k": "leave", "name": name})))
            renamed, self._renamed_apart = self._renamed_apart, {}
            for key, old in sorted(renamed.items()):
                client = self.room._joined.get(key)
                if client is not None and client.name != old:
                    self._queue_out(("event", self._stamp(
                        {"k": "rename", "old": old, "new": client.name})))
            unmutes, self._unmutes_apart = self._unmutes_apart, set()
            for name in sorted(unmutes):
                self._send_unmute_to_all(name)
            lifted = [] if restarted or forgotten else self._mutes_lifted_apart(
                muted_in_redis, unmuted_in_redis)
            answers, self._answers_apart = self._answers_apart, []
            for student, event in answers:
                self.publish_private(student, event)
            # Reported once the listener has had time to read what a frozen
            # channel held (see _report_missed()).
            self._missed_marks = missed
            self._missed_due = time.monotonic() + self.silence_seconds
            clients = list(self.room._joined.values())
            for client in clients:
                self.room._queue_for(client, WHOLE_LINE)
            self.room.recorder.note("room", WHOLE_LINE)
            untold, self._renames_untold = self._renames_untold, []
            for told in untold:
                self._tell_renamed(*told)
            if news:
                self.room._broadcast(news)  # here only: each server tells its own
            for client in clients:
                client.queue_line(self.room._online_line())
                self._rejoin(client)
            self._settle_quiet(quiet_elsewhere, forgotten)
        log.info("Linked through Redis again")
        self.room._send_queued(clients)
        for name in lifted:
            if lift_mutes(self.room, name):
                self.room.tell_console("Another server's teacher unmuted %s while "
                                       "this server was cut off." % name)

    def _mutes_lifted_apart(self, muted_in_redis, unmuted_in_redis):
        """The names whose mutes we hold that were lifted elsewhere during the
        split (lock held): forgotten here too.

        Lifted means Redis lists them as unmuted, and no more as muted: a
        muted set that is merely gone (a new lesson begun by a server that
        restarted meanwhile) lifts nothing.
        """
        unmuted = set_members(unmuted_in_redis) - set_members(muted_in_redis)
        lifted = sorted(key for key in self._mutes_stored
                        if self._mutes_wanted.get(key) and key in unmuted)
        names = []
        for key in lifted:
            self._mutes_wanted[key] = False
            self._mutes_stored.discard(key)
            self.muted_keys.discard(key)
            client = self.room._joined.get(key)
            names.append(client.name if client is not None else key)
        return names

    def _report_missed(self):
        """Tell the servers of whispers found missing at the relink that never came."""
        if not self._missed_marks or time.monotonic() < self._missed_due:
            return
        with self._private_came:
            missed = [mark for mark in self._missed_marks if mark not in self._private_got]
        self._missed_marks = []
        with self.room._lock:  # the link numbers what it sends under the room's lock
            for server, sequence in missed:
                self.publish_private(RemoteStudent("", server), {"k": "missed", "m": sequence})

    def _read_skipped(self, newest, restarted=False):
        """What the split hid from the reader (it goes on from the stream's end).

        Return (missed, changed, quiet_told): the (server, sequence) of each
        whisper to us whose mark is there and that never came; for each
        (server, name key) of other servers' students who left or took
        another name there, the name it took (None: it left); and whether
        another server set quiet mode there (see _relink()).
        restarted: Redis started again, so the whole stream is new: read it all.
        """
        if newest is None or self._last_id == "0":
            return [], {}, False
        # From the last entry read (no earlier than whispers are remembered),
        # a page at a time: a busy split may have left thousands.
        remembered = "%d-0" % max(  # by Redis's clock, which numbered the entries
            0, stream_position(newest)[0] - int(REDIS_MISSED_SECONDS * 1000))
        start = "-" if restarted else max(self._last_id, remembered, key=stream_position)
        marks, changed, quiet_told, read = [], {}, False, 0
        first_keys = {}  # (server, a name key now) -> the key of that student's before
        while read < REDIS_STREAM_EVENTS:
            entries = stream_entries(self._redis.call(
                "XRANGE", self.stream, start, newest, "COUNT", REDIS_READ_EVENTS))
            if entries and entries[0][0] == start:
                entries = entries[1:]  # read already (no "(" before Redis 6.2)
            if not entries:
                break
            read += len(entries)
            start = entries[-1][0]
            for _, fields in entries:
                try:
                    event = self._entry_event(fields)
                except BadEvent:
                    continue
                if event["k"] == "mark" and event["to"] == self.server_id:
                    marks.append((event["s"], event["m"]))
                elif event["s"] != self.server_id and event["k"] == "leave":
                    server = event.get("of", event["s"])  # (a reaper's, for a dead one)
                    key = fold_name(event["name"])
                    changed[server, first_keys.pop((server, key), key)] = None
                elif event["s"] != self.server_id and event["k"] == "rename":
                    server, key = event["s"], fold_name(event["old"])
                    first = first_keys.pop((server, key), key)
                    first_keys[server, fold_name(event["new"])] = first
                    changed[server, first] = event["new"]
                elif event["s"] != self.server_id and event["k"] == "quiet":
                    quiet_told = True
        with self._private_came:
            return [mark for mark in marks if mark not in self._private_got], changed, quiet_told

    def _settle_quiet(self, quiet_elsewhere, forgotten=False):
        """After a split, one quiet mode for the whole room again (room's lock held).

        If the teacher here turned it on or off during the split, the other
        servers follow; if not, this room follows them. forgotten: Redis
        lost the room, so "off" there says nothing: a quiet room stays so.
        """
        set_here, self._quiet_set_alone = self._quiet_set_alone, False
        quiet = self.room._quiet
        if quiet == quiet_elsewhere and not (set_here and forgotten):
            return  # (Redis forgot: its "off" says nothing, so ours is told too)
        if set_here or (forgotten and quiet):
            self.takes({"k": "quiet", "on": quiet}, [], None)  # shown here already
        else:
            self.room._quiet = quiet_elsewhere
            self.room._broadcast(event_lines({"k": "quiet", "on": quiet_elsewhere}))

    def _rejoin(self, client):
        """Tell the other servers a student of ours is here (room's lock held).

        Servers that still list the student ignore it; the others show a join.
        """
        self.takes({"k": "join", "name": client.name, "again": True}, [], client)

    def _holds(self, value):
        """True if a name key's value says this server holds the name."""
        try:
            return json.loads(value.decode("utf-8"))["server"] == self.server_id
        except (AttributeError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            return False

    def _release_if_ours(self, key):
        """Let a name go in Redis, if this server holds it."""
        self._release_key_if_ours(self._name_prefix + key)
        self._claimed.pop(key, None)

    def _release_key_if_ours(self, redis_key):
        # Look and delete in one script, which Redis runs whole: with a GET
        # then a DEL, a name another server claimed in between would be lost.
        self._redis.call("EVAL", RELEASE_IF_OURS_SCRIPT, 1, redis_key, self.server_id)

    def _reclaim(self, keys, rejoin=False):
        """Claim again the names of our students; rename those taken meanwhile."""
        for key in keys:
            with self.room._lock:
                client = self.room._joined.get(key)
            if client is None:
                continue
            if self._holds(self._redis.call("GET", self._name_prefix + key)) or \
                    self._redis.call("SET", self._name_prefix + key,
                                      self._name_value(client.name), "NX", "EX",
                                      self.name_ttl_seconds) is not None:
                self._claimed[key] = time.monotonic()
            else:
                self._rename_taken(client)
            if rejoin:
                with self.room._lock:
                    self._rejoin(client)

    def _rename_taken(self, client, looks_like=False):
        """Give a student whose name was taken during a split a free NAME.2, NAME.3 ...

        looks_like: a look-alike of its name was taken; its own name is let go.
        """
        old_name, old_key = client.name, client.key
        for number in itertools.count(2):
            suffix = ".%d" % number
            new_name = old_name[:MAX_NAME_CHARS - len(suffix)] + suffix
            if name_problem(new_name):  # cut short, it may read as a reserved name
                new_name = "student" + suffix
            key, looks = fold_name(new_name), looks_of(new_name)
            with self.room._lock:
                if self.room._name_taken(key, looks, client):
                    continue  # taken here, or by a look-alike
            if self._redis.call("SET", self._name_prefix + key, self._name_value(new_name),
                                 "NX", "EX", self.name_ttl_seconds) is not None:
                break
        self._claimed[key] = time.monotonic()
        with self.room._lock:
            if self.room._joined.get(client.key) is not client:
                return  # left meanwhile; the beat frees the name
            self.room._remove_client(client)
            # Its looks too: else a look-alike of the new name could join.
            client.name, client.key, client.looks = new_name, key, looks
            self.room._add_client(client)
            if old_key in self._renamed_apart:  # the others know it by its name
                # before the split: they hear of this rename from that one.
                self._renamed_apart[key] = self._renamed_apart.pop(old_key)
            shown = event_lines({"k": "rename", "old": old_name, "new": new_name})[0]
            told = (client, key, "*** While the servers were apart, a student on another "
                    "server took %s %s: you are now %s." % (
                        "a name that looks like" if looks_like else "the name",
                        old_name, new_name), shown)
            if self.linked:
                recipients = self._tell_renamed(*told)
            else:  # relinking: told after the news that the room is whole again
                self._renames_untold.append(told)
                recipients = []
        if looks_like:
            self._release_if_ours(old_key)  # ours, but its look-alike is online elsewhere
        log.info("%s was taken on another server: renamed %s", old_name, new_name)
        self.room._send_queued(recipients + [client])

    def _tell_renamed(self, client, key, personal, shown):
        """Tell a student renamed by _rename_taken() (to the name of key), and
        its room (lock held); return who to send to."""
        if self.room._joined.get(key) is not client:
            return []  # left, or took another name, since
        self.room._queue_for(client, personal)
        return self.room._broadcast(shown, exclude=client) + [client]

    def _scan(self, pattern, connection=None):
        """Every key that matches pattern (SCAN, a thousand at a time)."""
        keys, cursor = [], b"0"
        while True:
            reply = (connection or self._redis).call("SCAN", cursor, "MATCH", pattern,
                                                      "COUNT", 1000)
            if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
                    and all(isinstance(key, bytes) for key in reply[1])
                    and isinstance(reply[0], bytes) and reply[0].isdigit()):
                raise RedisProtocolError("a SCAN reply of the wrong shape")
            cursor, found = reply
            keys += found
            if cursor == b"0":
                return keys

    def _load_roster(self):
        """The students on other servers, from the name keys in Redis."""
        keys = self._scan(self._name_prefix + "*")
        values = self._redis.call("MGET", *keys) if keys else []
        remote = {}
        for value in values:
            try:
                holder = json.loads(value.decode("utf-8")) if value else None
                name, server = holder["name"], holder["server"]
            except (AttributeError, UnicodeDecodeError, ValueError, TypeError, KeyError):
                log.warning("A bad name key in Redis: %s", repr(value)[:80])
                continue
            if (isinstance(name, str) and isinstance(server, str) and server != self.server_id
                    and name_problem(name) is None and SERVER_ID.fullmatch(server)):
                remote[fold_name(name)] = RemoteStudent(name, server)
        return remote

    def _load_history(self):
        """The last --history room events, oldest first, and the stream's newest id."""
        count = max(self.room.settings.history, 1)
        # A whisper's mark shows no line: read back a page at a time until
        # enough entries do (REDIS_STREAM_EVENTS at most, the whole stream).
        entries, end, shown = [], "+", 0
        while shown < count and len(entries) < REDIS_STREAM_EVENTS:
            page = stream_entries(self._redis.call("XREVRANGE", self.stream, end, "-",
                                                    "COUNT", count + 1))
            if entries and page and page[0][0] == end:
                page = page[1:]  # the last one of the page before (no "(" before Redis 6.2)
            if not page:
                break
            entries += page
            shown += sum(1 for _, fields in page if not self._is_mark(fields))
            end = page[-1][0]
        newest = entries[0][0] if entries else "0"
        lines, present = [], set()  # who the history has shown joined
        for _, fields in reversed(entries):
            try:
                event = self._entry_event(fields)
            except BadEvent as error:
                log.warning("Dropped a bad event from Redis's history: %s", error)
                continue
            kind = event["k"]
            if kind in ("join", "leave"):
                key = fold_name(event["name"])
                # A rejoin after a split is news only where the student was let
                # go: after their join, it would read as a second one.
                if kind == "join" and event.get("again") and key in present:
                    continue
                (present.add if kind == "join" else present.discard)(key)
            elif kind == "rename":
                present.discard(fold_name(event["old"]))
                present.add(fold_name(event["new"]))
            lines += event_lines(event)
        return lines[-self.room.settings.history:] if self.room.settings.history else [], newest

    def _is_mark(self, fields):
        """True if a stream entry is a whisper's mark (see apply())."""
        try:
            return self._entry_event(fields)["k"] == "mark"
        except BadEvent:
            return False

    def _entry_event(self, fields):
        if not isinstance(fields, list) or len(fields) != 2 or fields[0] != b"e" \
                or not isinstance(fields[1], bytes):
            raise BadEvent("a stream entry of the wrong shape")
        return check_event(fields[1], ROOM_EVENTS, self.room.settings.max_line)

    # -- The reader thread: the stream's events into the room --

    def _run_reader(self):
        connection, failing_since, delay = None, None, self.retry_first_seconds
        while not self._stopping.is_set():
            try:
                if connection is None:
                    connection = RedisConnection(self.url, self.silence_seconds)
                    failing_since, delay = None, self.retry_first_seconds
                self._read_events(connection)
            except (OSError, RedisError) as error:
                if connection is not None:
                    connection.close()
                    connection = None
                failing_since = failing_since or time.monotonic()
                # A short gap is no split: the stream keeps what we missed.
                if isinstance(error, socket.timeout) or \
                        time.monotonic() - failing_since > self.silence_seconds:
                    self.split(error)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.retry_max_seconds)
            except Exception as error:  # a thread's top level: log it, go on
                if self._stopping.is_set():
                    break
                log.error("Redis reader: %r", error)
                self._stopping.wait(delay)
        if connection is not None:
            connection.close()

    def _read_events(self, connection):
        """Read the next events from the stream and show them (or wait for a relink)."""
        with self.room._lock:
            linked, resume, self._resume_id = self.linked, self._resume_id, None
        if resume is not None:
            self._last_id = resume  # after a split, go on from the relink
        if not linked:
            self._stopping.wait(self.block_milliseconds / 1000)
            connection.call("PING", timeout=self.silence_seconds)
            return
        reply = connection.call("XREAD", "COUNT", REDIS_READ_EVENTS, "BLOCK",
                                self.block_milliseconds, "STREAMS", self.stream,
                                self._last_id,
                                timeout=self.block_milliseconds / 1000 + self.silence_seconds)
        events = []
        for entry_id, fields in xread_entries(reply):
            self._last_id = entry_id
            try:
                events.append(self._entry_event(fields))
            except BadEvent as error:
                log.warning("Dropped a bad event from Redis: %s", error)
                origin = event_origin(fields[1]) if isinstance(fields, list) and \
                    len(fields) == 2 and isinstance(fields[1], bytes) else None
                if origin is not None and origin[0] == self.server_id:
                    with self.room._lock:  # ours, refused: never to be shown, even at a split
                        self._pending.pop(origin[1], None)
                        if origin[1] > self._last_seen.get(self.server_id, 0):
                            self._last_seen[self.server_id] = origin[1]
                        released = self._release_held() if self._held else []
                    self.room._send_queued(released)
        if events:
            self.apply(events)

    def apply(self, events):
        """Show room events from the stream to this server's students, in its order.

        At a mark for us, what follows waits until the listener has the
        whisper it marks (by pub/sub, on another connection and thread), for
        silence_seconds at most: else a line its sender said after it, read
        from the stream first, would overtake it.
        """
        events = collections.deque(events)
        while events:
            recipients = {}  # each client once, in order: one send carries all its lines
            mark = None
            with self.room._lock:
                if not self.linked or self._resume_id is not None:
                    return  # a split began while we read: the room is on its own
                while events and mark is None:
                    event = events.popleft()
                    server, sequence = event["s"], event["n"]
                    if sequence <= self._last_seen.get(server, 0):
                        continue  # sent twice (after a reconnect): shown already
                    if server == self.server_id and sequence > self._next_sequence:
                        # Not ours (a rogue writer to Redis): taken as ours, its
                        # number would hide every event we send after it.
                        self._note_console("Dropped an event in our name that we never sent")
                        continue
                    self._last_seen[server] = sequence
                    if event["k"] == "mark":
                        if event["to"] == self.server_id and server != self.server_id:
                            mark = server, event["m"]
                        continue
                    shown = (self._apply_own(event) if server == self.server_id
                             else self._apply_other(event))
                    recipients.update(dict.fromkeys(shown))
                    if self._held:  # right after the event they waited for, before the next
                        recipients.update(dict.fromkeys(self._release_held()))
            self.room._send_queued(list(recipients))
            if mark is not None:
                self._wait_for_private(*mark)

    def _wait_for_private(self, server, sequence):
        """Wait until the listener has acted on private message sequence of server.

        For silence_seconds at most, and not at all while nothing has come
        from that server since a wait for it ran out: waits must not add up
        (a listener that is reconnecting would hold this room back for each).
        """
        with self._private_came:
            seen = self._private_seen.get(server, 0)
            if self._waited_in_vain.get(server) == seen:
                return
            self._waited_in_vain.pop(server, None)
            if not self._private_came.wait_for(
                    lambda: self._private_seen.get(server, 0) >= sequence
                    or self._stopping.is_set(), self.silence_seconds):
                self._waited_in_vain[server] = self._private_seen.get(server, 0)

    def _apply_own(self, event):
        """One of our own events is back: show it now (room's lock held)."""
        sequence = event["n"]
        if sequence in self._pending:
            if event["k"] == "quiet":
                self._set_quiet(event["on"])
            shown = self._show_own(sequence)
            for client in [client for client, last_counted in self._welcomed.items()
                           if last_counted < sequence]:
                del self._welcomed[client]  # nothing it counted is still to come
            return shown
        if event["k"] == "leave" and "of" in event:
            return self._apply_other(event)  # a leave we announced for a dead server
        return []  # a leave or rename told to the others at a relink: shown here already

    def _apply_other(self, event):
        """Another server's event: update the roster, then show it (room's lock held)."""
        kind, remote = event["k"], self.room._remote
        if kind in ("join", "leave", "say", "act"):
            key = fold_name(event["name"])
        if kind == "join":
            if key in self.room._joined or remote.get(key) == (event["name"], event["s"]):
                return []  # a rejoin after a split: known already
            self._add_remote(RemoteStudent(event["name"], event["s"]))
        elif kind == "leave":
            student = remote.get(key)
            if student is None or student.server != event.get("of", event["s"]):
                return []  # not one of ours to lose (said already, or a stale name)
            self._remove_remote(key)
        elif kind == "rename":
            student = remote.get(fold_name(event["old"]))
            if student is None or student.server != event["s"]:
                self._note_console(
                    "Dropped a rename of a student we do not know: %s" % event["old"])
                return []
            self._remove_remote(fold_name(event["old"]))
            self._add_remote(RemoteStudent(event["new"], event["s"]))
        elif kind in ("say", "act") and remote.get(key, RemoteStudent("", "")).server \
                != event["s"]:
            self._note_console(
                "Dropped a message from a student we do not know: %s" % event["name"])
            return []
        elif kind == "quiet":
            if event["on"] == self.room._quiet:
                return []  # so it was here (each server tells the others after a relink)
            self._set_quiet(event["on"])
        return self.room._broadcast(event_lines(event), notice=is_notice(event))

    def _set_remote(self, students):
        """Make students (key -> RemoteStudent) the room's students elsewhere (lock held)."""
        self.room._remote.clear()
        self.room._remote_looks.clear()
        for student in students.values():
            self._add_remote(student)

    def _add_remote(self, student):
        """A student on another server, in the room's list with its skeleton (lock held)."""
        key = fold_name(student.name)
        self.room._remote[key] = student
        for look in looks_of(student.name):
            self.room._remote_looks[look] = key

    def _remove_remote(self, key):
        student = self.room._remote.pop(key)
        for look in looks_of(student.name):
            if self.room._remote_looks.get(look) == key:
                del self.room._remote_looks[look]

    def _set_quiet(self, quiet):
        self.room._quiet = quiet

    # -- The listener thread: our own channel (whispers, /kick, /mute) --

    def _subscribe(self):
        """A connection listening on our channel and the one to all servers (what
        is sent before is lost)."""
        connection = RedisConnection(self.url, self.silence_seconds)
        try:
            connection.send([("SUBSCRIBE", self.channel, self.all_channel)])
            for _ in range(2):  # one answer for each channel
                if isinstance(connection.read(), RedisError):
                    raise RedisError("SUBSCRIBE was refused")
        except (OSError, RedisError):
            connection.close()
            raise
        return connection

    def _run_listener(self):
        connection, delay = self._listener, self.retry_first_seconds
        while not self._stopping.is_set():
            try:
                if connection is None:
                    connection = self._subscribe()
                    delay = self.retry_first_seconds
                self._listen(connection)
            except (OSError, RedisError) as error:
                if self._stopping.is_set():
                    break  # the server stops (and Redis may with it): nothing to say
                if connection is not None:  # said once, not at every retry
                    log.info("Redis channel lost (%s): reconnecting", error)
                    connection.close()
                    connection = None
                self._stopping.wait(delay)
                delay = min(delay * 2, self.retry_max_seconds)
            except Exception as error:  # a thread's top level: log it, go on
                if self._stopping.is_set():
                    break
                log.error("Redis listener: %r", error)
                self._stopping.wait(delay)
        if connection is not None:
            connection.close()

    def _listen(self, connection):
        """Wait for one message on our channel; a PING proves a quiet Redis alive."""
        if self._held:  # (read without the lock: only a hint)
            self._release_late()
        try:
            message = connection.read(self.heartbeat_seconds)
        except socket.timeout:
            if time.monotonic() - connection.last_heard > self.channel_silence_seconds:
                raise  # not even the PINGs' answers came back: reconnect
            connection.send([("PING",)], self.silence_seconds)
            return
        if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
            try:
                event = check_event(message[2], PRIVATE_EVENTS, self.room.settings.max_line)
            except BadEvent as error:
                log.warning("Dropped a bad message from Redis: %s", error)
                origin = event_origin(message[2])
                if origin is not None and message[1] == self.channel.encode("utf-8"):
                    with self._private_came:  # a mark waits for it no more
                        if origin[1] > self._private_seen.get(origin[0], 0):
                            self._private_seen[origin[0]] = origin[1]
                        self._private_came.notify_all()
                return
            if message[1] != self.channel.encode("utf-8"):
                self._act_on_private(event)  # to all servers: no mark waits for it
                return
            with self._private_came:
                if event["n"] <= self._private_seen.get(event["s"], 0):
                    return  # sent again after its server reconnected: acted on already
                self._private_got[event["s"], event["n"]] = (time.monotonic(),)
                forget_old(self._private_got, REDIS_MISSED_SECONDS, REDIS_MISSED_WHISPERS)
            self._act_on_private(event)
            with self._private_came:  # the reader may wait for it at a mark
                self._private_seen[event["s"]] = event["n"]
                self._private_came.notify_all()
        # else: the answers to SUBSCRIBE and PING

    def _act_on_private(self, event):
        """A whisper to one of our students, the teacher's /kick or /mute from
        elsewhere, or that server's answer to one of ours (a "reply" for the
        console; "lost" when the student had just gone)."""
        if event["k"] == "missed":  # a whisper of ours that server never had
            if any(item[2]["n"] == event["m"] for item in list(self._unheard)):
                return  # sent again at each heartbeat: owned up to if never heard
            with self.room._lock:
                sent = self._whispers_sent.get(event["m"])
                if sent is not None and sent[2] == event["s"]:  # from the server it went to
                    del self._whispers_sent[event["m"]]
                else:
                    sent = None
            if sent is not None:
                self._own_up([sent[1]], "may not have arrived: their server was cut off")
            return
        kind, name = event["k"], event["name"] if event["k"] != "whisper" else event["to"]
        if kind == "reply":
            self.room.tell_console("The server of %s answers: %s" % (name, event["text"]))
            return
        if event.get("all"):  # to every server: an unmute (see unmute_everywhere())
            if kind == "mute" and not event["on"] and event["s"] != self.server_id and \
                    lift_mutes(self.room, event["name"]):
                self.room.tell_console("Another server's teacher unmuted %s." % event["name"])
            return
        if kind == "lost":  # one of ours whispered to someone who had just gone
            self._own_up([dict(event, k="whisper")],
                         "did not arrive: they had just left or changed name")
            return
        with self.room._lock:
            client = self.room._joined.get(fold_name(name))
            if client is not None and kind == "whisper":
                self.room.recorder.note("private", "%s whispers to %s: %s" % (
                    event["name"], client.name, event["text"]))
                lines = [(client, "%s whispers: %s" % (event["name"], event["text"]))]
                after = event.get("after", 0)
                if "after_id" in event and \
                        stream_position(event["after_id"]) <= self._read_from:
                    after = 0  # in the stream before where we began: never to come
                self.room._queue_private(lines, event["s"], after, event)
        if client is None:
            log.info("A %s for %s, who is not here (any more)", kind, name)
            with self.room._lock:  # the sender, or the asking console, is told
                if kind == "whisper":
                    self._tell_lost(event)
                else:
                    self.publish_private(RemoteStudent(name, event["s"]), {
                        "k": "reply", "name": name,
                        "text": "%s is not on this server any more." % name})
        elif kind == "whisper":
            self.room._send_queued([client])
        else:  # the teacher there acts here, as if at our console
            self.room.tell_console("Another server's teacher: /%s %s%s" % (
                "kick" if kind == "kick" else "mute" if event["on"] else "unmute", name,
                " " + event["reason"] if event.get("reason") else ""))
            console = TeacherConsole(self.room, None)
            console.for_another_server = True
            answers = []
            console.tell = answers.append  # shown here, and sent to the asking console
            if kind == "kick":
                console.do_kick(("%s %s" % (name, event.get("reason", ""))).strip())
            elif event["on"]:
                console.do_mute(name)
            else:
                console.do_unmute(name)
            with self.room._lock:  # the link numbers what it sends under the room's lock
                for text in answers:  # its words are for that console ("/unban
                    # bob at the console of bob's server"): said so here
                    self.room.recorder.note("console", "Answered that teacher: " + text)
                    self.publish_private(RemoteStudent(name, event["s"]),
                                      {"k": "reply", "name": name, "text": text})


# --- The line client: python chat_server.py --connect HOST[:PORT] -------------
# Adds a client for students with Python and no nc or telnet (Windows): two
# threads, one copying the socket to the screen, one the keyboard to the socket.

CONNECT_TIMEOUT_SECONDS = 10  # a lab network answers in well under a second
CLIENT_EOF_GRACE_SECONDS = 5  # after stdin ends: time for the last answers
CLIENT_LINE_MAX_BYTES = 64 * 1024  # a server line longer than this (a server gone
#                                    wrong) is shown in pieces, not held whole
POLL_SECONDS = 0.2  # short waits let Ctrl+C through on Windows too


def split_host_port(text):
    """Read 'host', 'host:port', '[ipv6]:port' or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""  # a name, an IPv4 address or a bare IPv6 one
    if not host:
        raise argparse.ArgumentTypeError("%r has no host" % text)
    return host, port_flag(port) if port else PORT


def run_line_client(address):
    """Join a chat server: stdin goes to it, what it sends goes to stdout."""
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):  # UTF-8 on every OS, pipes included
            stream.reconfigure(encoding="utf-8", errors="replace")
    try:
        sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as error:
        print("Cannot connect to %s: %s" % (format_address(address),
                                            error.strerror or error), file=sys.stderr)
        return EXIT_CONNECT_FAILED
    except KeyboardInterrupt:  # Ctrl+C while connecting (a wrong address, say)
        return EXIT_OK
    sock.settimeout(None)
    finished = threading.Event()
    # NOTE: recv() and reading stdin run in helper threads because Ctrl+C
    # does not interrupt a blocking recv() on Windows; the main thread only
    # waits, in short steps, so Ctrl+C always reaches it. (Starting them is
    # inside the try: a Ctrl+C may come while the second one starts.)
    try:
        for target in (print_from_server, send_from_stdin):
            threading.Thread(target=target, args=(sock, finished), daemon=True).start()
        while not finished.wait(POLL_SECONDS):
            pass
    except KeyboardInterrupt:
        pass
    sock.close()
    return EXIT_OK


def print_from_server(sock, finished):
    """Print each line the server sends until it closes the connection.

    Each is cleaned as a student's text is (clean_line()): a server that is
    not ours (a classmate's, say) cannot send escape sequences to the terminal.
    """
    pending = bytearray()  # the line being received
    try:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                break
            pending += data
            # Only the new bytes can end a line: what came before had no end.
            cut = pending.rfind(b"\n", len(pending) - len(data)) + 1
            if not cut and len(pending) >= CLIENT_LINE_MAX_BYTES:
                cut = len(pending)  # a line with no end in sight: shown in pieces
            if cut:
                lines = bytes(pending[:cut]).split(b"\n")
                del pending[:cut]
                if not lines[-1]:
                    lines.pop()  # the piece ended with a line end
                for line in lines:
                    print(clean_line(line.rstrip(b"\r")), flush=True)
        if pending:
            print(clean_line(bytes(pending)), flush=True)
    except (OSError, ValueError):
        pass  # the connection broke, or stdout was closed
    finally:
        finished.set()


def send_from_stdin(sock, finished):
    """Send each line typed on stdin; at its end, let the server finish."""
    try:
        for line in sys.stdin:
            sock.sendall(encode_line(line.rstrip("\r\n")))
        sock.shutdown(socket.SHUT_WR)  # the server answers what is left, then closes
    except (OSError, ValueError):
        finished.set()  # the connection broke, or stdin was closed
        return
    finished.wait(CLIENT_EOF_GRACE_SECONDS)
    finished.set()


# --- Starting the server: logging, flags, banner, main() ----------------------
# main() parses the flags and runs serve(): it makes the ChatServer, starts
# the console, and serves until Ctrl+C or /shutdown.

LOG_QUEUE_RECORDS = 10000  # console lines held while the console is paused


class NonBlockingQueueHandler(logging.handlers.QueueHandler):
    """Hands log records to the console thread; never waits for it."""

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            pass  # the console is paused (a click in a Windows console): skip


def configure_logging():
    """Log to stderr with timestamps, from one thread; return a function that stops it.

    Every other thread only queues its records, so a console that stops
    taking output (paused, or a full pipe) holds up nothing but that thread.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a Windows console may not be UTF-8
            stream.reconfigure(errors="backslashreplace")
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    try:
        terminal = sys.stderr.isatty()  # asked once: a log file or a pipe stays one
    except (AttributeError, ValueError):
        terminal = False  # no console at all (pythonw)
    records = queue.Queue(LOG_QUEUE_RECORDS)
    root = logging.getLogger()
    root.addHandler(NonBlockingQueueHandler(records))
    root.setLevel(logging.INFO)

    # NOTE: not a logging.StreamHandler: at exit, logging waits for every
    # handler's lock, and a stuck console would then hang the exit too.
    def write_records():
        for record in iter(records.get, None):
            try:
                text = formatter.format(record)
                if terminal:  # no row may pass for a line (see fit_to_terminal())
                    text = fit_to_terminal(text, console_columns())
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass  # no console at all (pythonw), or it was closed

    writer = threading.Thread(target=write_records, name="console log", daemon=True)
    writer.start()

    def stop():
        # Let the console catch up, but never wait long for a stuck one.
        try:
            records.put(None, timeout=SHUTDOWN_GRACE_SECONDS)
        except queue.Full:
            return
        join_in_slices(writer, SHUTDOWN_GRACE_SECONDS)

    return stop


def count_flag(minimum):
    """An argparse type: a whole number no smaller than minimum."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text)
        if value < minimum:
            raise argparse.ArgumentTypeError("must be at least %d, not %d" % (minimum, value))
        return value

    return parse


def number_flag(maximum):
    """An argparse type: a number from 0 to maximum (seconds, minutes, a rate)."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if not 0 <= value <= maximum:  # also refuses nan and infinity
            raise argparse.ArgumentTypeError("must be from 0 to %g, not %s" % (maximum, text))
        return value

    return parse


def port_flag(text):
    """An argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    value = count_flag(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("must be at most 65535, not %d" % value)
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one clear line instead of the whole usage."""

    def error(self, message):
        self.exit(EXIT_STARTUP_ERROR, "%s: error: %s (see --help)\n" % (self.prog, message))


def parse_args(argv=None):
    """Read the command line; each limit's flag defaults to its constant."""
    parser = ArgumentParser(
        prog="chat_server.py",
        allow_abbrev=False,  # --pass for --password: the banner could not hide it
        description="A classroom chat server. Students join with a browser "
        "(http://HOST:PORT/), nc, telnet, PuTTY (Raw) or python chat_server.py "
        "--connect HOST.",
    )
    add = parser.add_argument
    add("--host", default=HOST, help="address to listen on; 0.0.0.0 opens the "
        "room to the network, :: also for IPv6 (default: %(default)s)")
    add("--port", type=port_flag, default=PORT, help="TCP port (default: %(default)s)")
    add("--password", default=None,  # None: CHAT_PASSWORD, or none (see below)
        help="room password students must type first; or set CHAT_PASSWORD, which "
        "other users cannot see in ps (default: none)")
    add("--max-clients", type=count_flag(1), default=MAX_CLIENTS,
        help="connections open at once; at least 1 (default: %(default)s)")
    add("--max-line", type=count_flag(64), default=MAX_LINE_BYTES,
        help="longest line a student may send, in bytes; at least 64 "
        "(default: %(default)s)")
    add("--flood-rate", type=number_flag(MAX_FLOOD_RATE), default=FLOOD_RATE_LINES_PER_SECOND,
        help="lines a second before a client is slowed down; 0: no pacing of any "
        "kind (default: %(default)s)")
    add("--flood-burst", type=count_flag(1), default=FLOOD_BURST_LINES,
        help="lines a client may send at once; at least 1 (default: %(default)s)")
    add("--nick-rate", type=count_flag(0), default=NICK_RATE_PER_MINUTE,
        help="renames a minute per client; 0: no limit (default: %(default)s)")
    add("--name-timeout", type=number_flag(MAX_NAME_TIMEOUT_SECONDS), default=NAME_TIMEOUT_SECONDS,
        help="seconds to give the password and a name; 0: no limit (default: %(default)s)")
    add("--sendq", type=count_flag(4096), default=SENDQ_BYTES,
        help="bytes queued for a client before it is dropped as too slow; at "
        "least 4096 (default: %(default)s)")
    add("--history", type=count_flag(0), default=HISTORY_EVENTS,
        help="room events shown to a newcomer; 0: none (default: %(default)s)")
    add("--ban-minutes", type=number_flag(MAX_BAN_MINUTES), default=BAN_MINUTES,
        help="minutes a kicked address must wait to rejoin (default: %(default)s)")
    add("--per-address", type=count_flag(0), default=PER_ADDRESS,
        help="connections from one computer (joins and wrong passwords are paced "
        "in proportion); 0: off, for a lab that shares one machine or one "
        "address (default: %(default)s)")
    add("--room-rate", type=count_flag(0), default=ROOM_BYTES_PER_SECOND,
        help="bytes a second of students' text the whole room takes in; senders "
        "past it wait; 0 (or --flood-rate 0): no limit (default: %(default)s)")
    add("--transcript", metavar="FILE", help="append every room event to FILE, "
        "one timestamped line each (default: none)")
    add("--transcript-private", action="store_true", help="also show private "
        "messages on the console and in the transcript (default: off)")
    add("--redis", metavar="redis://[:PASSWORD@]HOST[:PORT][/ROOM]", type=redis_url_flag,
        default=None,  # None: CHAT_REDIS, or not linked (see below)
        help="link this room to every other server on that Redis and room (port %d, room "
        "%s unless given); or set CHAT_REDIS (default: not linked)" % (REDIS_PORT, REDIS_ROOM))
    add("--connect", metavar="HOST[:PORT]", type=split_host_port,
        help="be a client instead: join the chat server at HOST (port %d unless given)" % PORT)
    args = parser.parse_args(argv)
    if args.password == "":  # typed, so meant: but Enter alone only asks again
        parser.error("argument --password: an empty password could never be typed "
                     "(leave --password out, and CHAT_PASSWORD unset, for no password)")
    if args.redis is None and os.environ.get("CHAT_REDIS"):  # checked here, so that
        try:  # a mistake in it is named as CHAT_REDIS, not as --redis
            args.redis = redis_url_flag(os.environ["CHAT_REDIS"])
        except argparse.ArgumentTypeError as error:
            parser.error("CHAT_REDIS: %s" % error)
    if args.password is None:  # an empty CHAT_PASSWORD is one not set
        args.password = os.environ.get("CHAT_PASSWORD", "")
    problem = password_problem(args.password, args.max_line)
    if problem:
        parser.error("argument --password (or CHAT_PASSWORD): " + problem)
    return args


def password_problem(password, max_line):
    """Why students could never type password, or None.

    A student's answer is read as a chat line: cleaned, spaces at either end
    left out, and at most --max-line bytes.
    """
    if password != password.strip():
        return "spaces at either end could never be typed"
    if clean_line(password.encode("utf-8", "replace")) != password:
        return "tabs and other control characters could never be typed"
    if len(password.encode("utf-8")) > max_line:
        return "longer than --max-line (%d bytes)" % max_line
    return None


def settings_from(args):
    """The room's Settings from parsed flags (they share their names)."""
    return Settings(**{field.name: getattr(args, field.name)
                       for field in dataclasses.fields(Settings)})


def lan_addresses():
    """The addresses other computers reach this one at, best first, or [].

    First the way the OS routes: connect() on a UDP socket sends nothing,
    but picks the source address for that destination. Then the host name's
    addresses (on Debian-like systems that gives 127.0.1.1, hence first).
    """
    found = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(ROUTE_PROBE_ADDRESS)  # no packet leaves: UDP has no handshake
        found.append(probe.getsockname()[0])
    except OSError:
        pass  # no network at all
    finally:
        probe.close()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    found += sorted({info[4][0] for info in infos} - set(found))
    return [address for address in found
            if not address.startswith(("127.", "0.", "169.254."))]


def announce_address(server, transcript, argv):
    """Log where the server listens, how students join, and what is on.

    Every line fits an 80-column terminal with its timestamp.
    """
    host, port = server.server_address[:2]
    settings = server.settings
    log.info("Listening on %s (Ctrl+C stops the server).", format_address((host, port)))
    if host in ("0.0.0.0", "::"):
        hosts = lan_addresses()
        if not hosts:
            log.info("Could not find this computer's address: see `ip addr` (Linux),")
            log.info("`ipconfig` (Windows) or System Settings > Network (macOS).")
            hosts = ["ADDRESS"]
    else:
        hosts = [host]
    for join_host in hosts[:3]:
        where = format_address((join_host, port))
        log.info("Students join at %s with:", join_host)
        log.info("  a browser:  http://%s/", where)
        log.info("  nc %s %s   or   telnet %s %s", join_host, port, join_host, port)
        log.info("  python chat_server.py --connect %s", where)
    log.info("Password: %s", "on (students type it first)." if settings.password
             else "off (--password sets one).")
    log.info("Transcript: %s", transcript.path if transcript
             else "off (--transcript FILE keeps one).")
    if host.startswith("127.") or host == "::1":
        # The teacher's own flags, but the port it got (not "--port 0"), and
        # no password: this screen may be the one the class sees.
        words = with_flag(argv, "--host", "0.0.0.0")
        if len(without_flag(argv, "--port")) < len(argv):
            words = with_flag(words, "--port", str(port))
        secret = ["--password"] + (["--redis"] if settings.redis and settings.redis.password
                                   else [])
        hidden = [flag for flag in secret if len(without_flag(words, flag)) < len(words)]
        for flag in hidden:
            words = without_flag(words, flag)
        log.info("Only this computer can join. To open the room to the lab:")
        log.info("  %s", command_line(["python", "chat_server.py"] + words))
        if hidden:
            log.info("  (and your %s, not shown here)", " and ".join(hidden))


def with_flag(argv, flag, value):
    """argv with flag set to value (replaced if it was there, else added first)."""
    return [flag, value] + without_flag(argv, flag)


def without_flag(argv, flag):
    """argv without flag and its value (as --flag VALUE or --flag=VALUE)."""
    result, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = True
        elif not word.startswith(flag + "="):
            result.append(word)
    return result


def command_line(words):
    """A command as the teacher would type it in this computer's shell."""
    if sys.platform == "win32":
        return subprocess.list2cmdline(words)
    return " ".join(shlex.quote(word) for word in words)


def raise_open_file_limit(clients):
    """Allow one open file per client, the refused ones still being told why,
    and some to spare, where the OS lets us.

    macOS starts programs with a limit of 256 open files, which a big class
    with --max-clients 300 would hit.
    """
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Refused: those the Refuser holds, and as many waiting to be taken on.
    wanted = clients + 2 * REFUSALS_AT_ONCE + FILES_BESIDES_CLIENTS
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as error:
        log.warning("Could not raise the limit of %d open files (%s): fewer than "
                    "%d students may be able to join.", soft, error, clients)


def describe_startup_error(error, host, port):
    """One sentence saying why the server could not start listening."""
    if error.errno == errno.EADDRINUSE:
        return ("Port %d is already in use (is another chat server running?). "
                "Stop it, or choose another port with --port." % port)
    if error.errno == errno.EACCES:
        return "Not allowed to listen on port %d; try a port above 1023." % port
    return "Cannot listen on %s: %s." % (format_address((host, port)),
                                         error.strerror or error)


def main(argv=None):
    """Run the chat server (or, with --connect, the line client); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.connect:
        if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:  # set at the top
            signal.signal(signal.SIGINT, signal.default_int_handler)  # it ends quietly
        return run_line_client(args.connect)
    stop_logging = configure_logging()
    try:
        return serve(args, argv)
    finally:
        stop_logging()


def handle_stop_signals(handler):
    """Set handler for each of STOP_SIGNALS, but SIGHUP if it was ignored when
    we started: nohup does that, so that the server outlives its terminal.

    During the shutdown (handler is exit_at_once), SIGHUP is ignored: the
    terminal closing just after a Ctrl+C must not cut the goodbye short.
    """
    for stop_signal in STOP_SIGNALS:
        if stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, handler)
        elif signal.getsignal(stop_signal) is not signal.SIG_IGN:
            signal.signal(stop_signal, signal.SIG_IGN if handler is exit_at_once else handler)


def stop_on_signal(server):
    """A handler for Ctrl+C and SIGTERM (a service manager's "stop"): shut down in order.

    It only starts the shutdown, in a thread of its own: raising
    KeyboardInterrupt instead would land wherever the main thread happens to
    be, and in the middle of admitting a client socketserver closes that
    client's connection. A second signal during the shutdown ends at once.
    """

    def handler(signum, frame):
        if server.is_closing():  # /shutdown began it: this is a second stop
            exit_at_once(signum, frame)
        handle_stop_signals(exit_at_once)
        threading.Thread(target=server.stop_serving, name="shutdown", daemon=True).start()

    return handler


def exit_at_once(signum, frame):
    """A second Ctrl+C (or SIGTERM) during the shutdown: stop now, quietly."""
    try:
        os.write(2, b"Stopped at once (a second interrupt during the shutdown).\n")
    except OSError:
        pass  # no console to write to (pythonw, a service)
    os._exit(EXIT_INTERRUPTED)


def wait_in_slices(wait, seconds):
    """Call wait(timeout) in short slices until it returns true or seconds pass.

    Python runs signal handlers in the main thread only, between two of its
    steps. The OS may deliver a second Ctrl+C to another thread, and then a
    long wait in the main thread would hold the handler back until the wait
    ended; with short slices it runs at once.
    """
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if wait(max(0.0, min(left, SIGNAL_CHECK_SECONDS))):
            return True
        if left <= SIGNAL_CHECK_SECONDS:
            return False


def join_in_slices(thread, seconds):
    """Wait up to seconds for a thread to end (see wait_in_slices())."""
    if thread.ident is not None:  # started
        wait_in_slices(lambda timeout: thread.join(timeout) or not thread.is_alive(), seconds)


def serve(args, argv):
    """Serve the room until Ctrl+C or /shutdown; return the exit status."""
    try:
        transcript = Transcript(args.transcript) if args.transcript else None
    except OSError as error:
        log.error("Cannot open the transcript %s: %s.", args.transcript, error.strerror)
        return EXIT_STARTUP_ERROR
    raise_open_file_limit(args.max_clients)
    try:
        server = ChatServer((args.host, args.port), settings_from(args), transcript)
    except OSError as error:  # socket.gaierror too: an unknown host name
        log.error("%s", describe_startup_error(error, args.host, args.port))
        return EXIT_STARTUP_ERROR
    except RedisStartError as error:  # --redis: unreachable, or a wrong password
        log.error("%s", error)
        return EXIT_STARTUP_ERROR
    announce_address(server, transcript, argv)
    if transcript is not None:  # so that runs appending to one file stand apart
        transcript.write("=== The chat server started on %s. ===" % format_address(
            server.server_address))
    stdin = console_input()
    if stdin is not None:
        # In the background, the console says so itself; a pipe or a file
        # may end at once: say nothing yet.
        if stdin.isatty() and not in_background(stdin):
            log.info("Type here to announce to everyone; /help lists your commands.")
        TeacherConsole(server, stdin).start()
    handle_stop_signals(stop_on_signal(server))
    try:
        server.serve_forever(SHUTDOWN_POLL_SECONDS)  # returns after stop_serving()
    except KeyboardInterrupt:
        pass  # a Ctrl+C before the handler was in place (main() called, not run as a script)
    finally:
        # From here on, a second Ctrl+C means "stop now", not a traceback.
        handle_stop_signals(exit_at_once)
        server.close_room()  # done already by stop_serving(), unless interrupted
        server.server_close()
        if transcript is not None:
            transcript.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
