"""Several servers, one room: servers linked through a real Redis.

The RESP client and the event checks are tested on bytes, without Redis.
The rest start redis-server (skipped, or failed under CI, when it is not
installed) and two or three chat servers against it; LinkProxy plays the
network between a server and Redis to freeze or cut the link.
"""

import argparse
import collections
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

import chat_server
from chat_server import RedisError, RedisProtocolError, RespParser, TeacherConsole
from conftest import (TIMEOUT, SERVER_SCRIPT, ChatClient, console_lines, expect_console,
                      find_tool, server_process, wait_until)
from redis_helpers import LinkProxy, RedisServer, free_port, redis_env
from websocket_client import ChatSocket

# Timings short enough for tests; each is a RedisLink class attribute.
FAST_LINK = {
    "silence_seconds": 1.0,
    "block_milliseconds": 200,
    "retry_first_seconds": 0.05,
    "retry_max_seconds": 0.5,
    "heartbeat_seconds": 0.2,
    "heartbeat_ttl_seconds": 2,
    "name_ttl_seconds": 10,
}
SPLIT_TIMEOUT = 10.0  # a split is declared after 0.5-1 s of silence; relinks back off


# --- RESP, without Redis ------------------------------------------------------


def test_a_command_is_an_array_of_bulk_strings_whatever_the_text():
    text = "*3\r\n$3\r\nDEL\r\n$4\r\nroom\r\n"
    assert chat_server.encode_command("XADD", text, 7) == (
        b"*3\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n7\r\n" % (len(text), text.encode()))


def test_a_reply_split_anywhere_is_parsed_once_whole():
    reply = b"*3\r\n$5\r\nhello\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n"
    parser = RespParser()
    for byte in reply[:-1]:
        parser.feed(bytes([byte]))
        assert parser.next_reply() is chat_server.INCOMPLETE
    parser.feed(reply[-1:])
    assert parser.next_reply() == [b"hello", 42, ["OK", None]]
    assert parser.next_reply() is chat_server.INCOMPLETE


def test_an_error_reply_carries_redis_own_message():
    parser = RespParser()
    parser.feed(b"-WRONGPASS invalid username-password pair\r\n")
    error = parser.next_reply()
    assert isinstance(error, RedisError)
    assert str(error) == "WRONGPASS invalid username-password pair"


@pytest.mark.parametrize("data", [b'{"k":"whisper"}', b'{"k":"say","n":1}'],
                         ids=["private", "room"])
def test_an_event_with_no_server_is_a_bad_event(data):
    kinds = chat_server.PRIVATE_EVENTS if b"whisper" in data else chat_server.ROOM_EVENTS
    with pytest.raises(chat_server.BadEvent):
        chat_server.check_event(data, kinds, 500)


@pytest.mark.parametrize("reply", [
    b"$%d\r\n" % (chat_server.REDIS_MAX_BULK_BYTES + 1),
    b"*%d\r\n" % (chat_server.REDIS_MAX_ARRAY_ITEMS + 1),
    b"$-2\r\n",
    b":12a\r\n",
    b"?what\r\n",
    b"*1\r\n" * (chat_server.REDIS_MAX_DEPTH + 1),
    b"$3\r\nabcde\r\n",
    b"+" + b"x" * (chat_server.MAX_LINE_BYTES + 10),
], ids=["huge bulk", "huge array", "negative size", "bad integer", "unknown type",
        "too deep", "bulk without its end", "endless line"])
def test_a_reply_out_of_bounds_is_a_protocol_error(reply):
    parser = RespParser()
    parser.feed(reply)
    with pytest.raises(RedisProtocolError):
        parser.next_reply()


def test_a_redis_url_gives_host_port_password_and_room():
    url = chat_server.redis_url_flag("redis://:s%40cret@127.0.0.1:7000/lab2")
    assert (url.host, url.port, url.password, url.room) == ("127.0.0.1", 7000, "s@cret", "lab2")
    url = chat_server.redis_url_flag("redis://localhost")
    assert (url.port, url.room, url.password) == (6379, "chat", "")


@pytest.mark.parametrize("text", [
    "redis://192.0.2.7/lab", "redis://redis.example.org", "http://127.0.0.1", "redis://[::1]:x",
    "redis://127.0.0.1/bad room",
], ids=["remote address", "remote name", "not redis", "bad port", "bad room"])
def test_a_bad_or_unprotected_redis_url_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        chat_server.redis_url_flag(text)


@pytest.mark.parametrize("text, told", [
    ("redis://secret@127.0.0.1:7000/lab", "give the Redis password after a colon: "
                                          "redis://:PASSWORD@127.0.0.1:7000/lab"),
    ("redis://:pw@127.0.0.l/lab", "'127.0.0.l' is not an address: is a letter standing "
                                  "for a digit?"),
], ids=["password without its colon", "a letter for a digit"])
def test_a_redis_url_mistake_is_named(text, told):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(told)):
        chat_server.redis_url_flag(text)


@pytest.mark.parametrize("refusal, told", [
    ("NOAUTH Authentication required.", "it wants a password (redis://:PASSWORD@HOST, in --redis or CHAT_REDIS)"),
    ("WRONGPASS invalid username-password pair or user is disabled.",
     "the password in the Redis URL is wrong"),
    ("ERR AUTH <password> called without any password configured for the default user. "
     "Are you sure your configuration is correct?",
     "it has no password: leave the password out of the Redis URL"),
    ("ERR something else", "ERR something else"),
])
def test_redis_refusing_our_password_is_said_in_plain_words(refusal, told):
    assert chat_server.redis_refusal(RedisError(refusal)) == told


def test_something_else_than_redis_at_the_redis_port_is_one_line_and_exit_2():
    listener = socket.create_server(("127.0.0.1", 0))
    answered = threading.Thread(target=lambda: listener.accept()[0].sendall(
        b"HTTP/1.1 400 Bad Request\r\n\r\n"), daemon=True)
    answered.start()
    try:
        result = subprocess.run(
            [sys.executable, SERVER_SCRIPT, "--port", "0", "--redis",
             "redis://127.0.0.1:%d/lab" % listener.getsockname()[1]],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT * 2)
    finally:
        listener.close()
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "is not Redis" in lines[0] and "is the port right?" in lines[0], \
        lines


@pytest.mark.parametrize("lines", [["a"] * 9000, ["\u672c" * 4000] * 40],
                         ids=["many lines", "many bytes"])
def test_a_batch_of_messages_fits_in_one_redis_event(lines):
    """A browser's one message may hold thousands of lines: every linked server
    would refuse them all as one event."""
    handler = types.SimpleNamespace(received=collections.deque(lines),
                                    flood=chat_server.FloodLimiter(0, 10))
    texts = ["first"] + chat_server.more_messages(handler)
    assert 1 < len(texts) <= chat_server.REDIS_MAX_EVENT_TEXTS
    chat_server.check_event(json.dumps({"k": "say", "s": "0123456789abcdef", "n": 1,
                                        "name": "alice", "texts": texts}).encode(),
                            chat_server.ROOM_EVENTS, 16 * 1024)
    assert len(handler.received) == len(lines) - len(texts) + 1  # the rest: the next batch


def test_a_chat_server_given_as_redis_is_named_and_nobody_joins_it(server, caplog):
    result = subprocess.run(
        [sys.executable, SERVER_SCRIPT, "--port", "0", "--redis",
         "redis://127.0.0.1:%d/lab" % server.server_address[1]],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT * 2)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "it is a chat server, not Redis: is the port right?" in lines[0], \
        lines
    expect_console(caplog, "Closed connection: 127.0.0.1:")
    assert not [line for line in console_lines(caplog) if "joined" in line]


def test_a_redis_elsewhere_is_accepted_with_a_password():
    assert chat_server.redis_url_flag("redis://:pw@192.0.2.7/lab").password == "pw"


def test_the_redis_url_and_room_password_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAT_REDIS", "redis://127.0.0.1:7001/lab")
    monkeypatch.setenv("CHAT_PASSWORD", "owl")
    args = chat_server.parse_args([])
    assert (args.redis.port, args.redis.room, args.password) == (7001, "lab", "owl")


def test_a_mistake_in_chat_redis_is_named_as_chat_redis_not_as_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("CHAT_REDIS", "redis://127.0.0.1:70o1/lab")
    with pytest.raises(SystemExit) as exit_info:
        chat_server.parse_args([])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "CHAT_REDIS: " in error and "--redis" not in error, error


def test_the_redis_flag_wins_over_chat_redis(monkeypatch):
    monkeypatch.setenv("CHAT_REDIS", "redis://127.0.0.1:70o1/lab")  # not even read
    assert chat_server.parse_args(["--redis", "redis://127.0.0.1/physics"]).redis.room == "physics"


def event(**fields):
    return json.dumps(dict({"s": "0123456789abcdef", "n": 1}, **fields)).encode()


@pytest.mark.parametrize("data", [
    b"not json",
    b"[1, 2]",
    event(k="shell", text="rm -rf /"),
    event(k="say", name="bob", texts=["hi"], n=-1),
    event(k="say", name="bob", texts=["hi"], s="NOT-A-SERVER"),
    event(k="say", name="bob smith", texts=["hi"]),
    event(k="say", name="teacher", texts=["hi"]),
    event(k="say", name="bob", texts=[]),
    event(k="say", name="bob", texts=["\x1b[2Jcleared"]),
    event(k="announce", text="x" * 70000),
    event(k="say", name="bob", texts=["x" * 60000] * 3),
    event(k="say", name="bob", texts=5),
    event(k="announce", text="\x07bell"),
    event(k="join"),
    event(k="quiet", on="yes"),
], ids=["not JSON", "not an object", "unknown kind", "negative sequence", "bad server",
        "space in name", "reserved name", "no texts", "escape sequence", "too long",
        "too long together", "texts not a list", "control character", "missing name",
        "flag not a bool"])
def test_a_bad_event_from_redis_is_refused(data):
    with pytest.raises(chat_server.BadEvent):
        chat_server.check_event(data, chat_server.ROOM_EVENTS, 1024)


def test_a_line_longer_than_our_max_line_passes_from_a_server_with_a_larger_one():
    """Linked servers may differ in --max-line: a 2000-byte line is still a good line."""
    data = event(k="say", name="bob", texts=["short", "x" * 2000, "short too"])
    assert chat_server.check_event(data, chat_server.ROOM_EVENTS, 1024)["texts"][1] == "x" * 2000


def test_a_good_event_passes_every_check():
    data = event(k="say", name="Zoë", texts=["hello", "  indented"])
    assert chat_server.check_event(data, chat_server.ROOM_EVENTS, 1024)["texts"][1] == "  indented"


def test_without_redis_no_redis_code_runs(server):
    assert server._link is None
    assert not [t for t in threading.enumerate() if t.name.startswith("redis")]


# --- Linked servers, against a real redis-server ------------------------------


@pytest.fixture
def redis_server():
    """A redis-server of its own for this test, killed at the end."""
    server = RedisServer(find_tool("redis-server"))
    yield server
    server.stop()


@pytest.fixture
def fast_link(monkeypatch):
    for name, value in FAST_LINK.items():
        monkeypatch.setattr(chat_server.RedisLink, name, value)


@pytest.fixture
def quick_split(fast_link, monkeypatch):
    """For tests that wait for a split: 0.5 s of silence is one (still 5 heartbeats)."""
    monkeypatch.setattr(chat_server.RedisLink, "silence_seconds", 0.5)
    monkeypatch.setattr(chat_server.RedisLink, "heartbeat_seconds", 0.1)
    monkeypatch.setattr(chat_server.RedisLink, "block_milliseconds", 100)
    monkeypatch.setattr(chat_server.RedisLink, "retry_max_seconds", 0.2)


@pytest.fixture
def proxies(redis_server):
    """A factory: proxies() is a LinkProxy to this test's Redis; all are closed after."""
    made = []

    def make():
        made.append(LinkProxy(redis_server.port))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def linked_servers():
    """The servers linked() started in this test."""
    return []


@pytest.fixture
def linked(redis_server, start_server, fast_link, linked_servers):
    """A factory: linked() starts a ChatServer linked to this test's Redis (or via a proxy)."""

    def start(via=None, **settings):
        settings.setdefault("flood_rate", 0)
        url = redis_server.settings_url(port=via.port if via else None)
        linked_servers.append(start_server(redis=url, **settings))
        return linked_servers[-1]

    return start


@pytest.fixture
def two_rooms(linked, join):
    """(a, b, alice, bob): two linked servers, alice joined on a, bob on b;
    alice has read bob's join line."""
    a, b = linked(), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    alice.expect("*** bob joined the chat.")
    return a, b, alice, bob


@pytest.fixture
def split_rooms(linked, join, proxies, quick_split):
    """(proxy, a, b, amy, bob): a linked through a proxy, b directly, amy on a and
    bob on b; then the proxy is frozen, and amy has been told a is on its own."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    amy = join(a, "amy")
    bob = join(b, "bob")
    proxy.freeze()
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    return proxy, a, b, amy, bob


def joined_on(server, name):
    """A client joined as name on server; the caller closes it (or the test ends)."""
    return ChatClient(server.server_address).join(name)


@pytest.fixture
def clients():
    """A list to put clients in: all are closed after the test."""
    made = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def join(clients, linked_servers):
    """A factory: join(server, "alice") joins and keeps the client for closing.

    It then waits until every linked server lists the newcomer (their rosters
    follow the stream, a moment behind), and until the join is back from the
    stream on its own server, so that whoever joins next sees them in the
    history and the list of who is online, not as a late join. settle=False
    skips that (during a split, the others never will).
    """

    def make(server, name, settle=True):
        clients.append(joined_on(server, name))
        if settle:
            for other in linked_servers:
                wait_known(other, name)
            wait_until(lambda: not server._link._pending, message="the join back from Redis")
        return clients[-1]

    return make


def wait_known(server, *names):
    """Wait until server lists names (its roster follows the stream, a moment behind)."""
    wait_until(lambda: all(name in server.who() for name in names),
               message="%s known to the server" % ", ".join(names))


def read_messages(client, count):
    """The next count 'NAME says: TEXT' lines client reads (other lines skipped)."""
    messages = []
    while len(messages) < count:
        line = client.read_line()
        assert line is not None, "closed after %r" % messages
        if " says: " in line:
            messages.append(line)
    return messages


def lines_until(client, text, timeout=None):
    """Every line client reads up to and including the one containing text."""
    start = len(client.seen)
    client.expect(text, timeout)
    return client.seen[start:]


redis = pytest.mark.redis  # on each test that needs redis-server


def test_a_servers_name_among_the_linked_ones_says_where_it_runs():
    first = chat_server.server_id("LAB-PC_17.school.local", 1337)
    assert first.startswith("lab-pc-17-1337-") and chat_server.SERVER_ID.fullmatch(first)
    assert chat_server.server_id("LAB-PC_17.school.local", 1337) != first  # new at each start
    assert chat_server.SERVER_ID.fullmatch(chat_server.server_id("\u00c9cole \u2603", 80))


@redis
def test_the_teachers_who_names_the_server_of_a_student_elsewhere(linked, join, caplog):
    a, b = linked(), linked()
    join(a, "alice")
    join(b, "bob")
    row = next(line for line in console_who(a, caplog) if line.startswith("bob "))
    place = chat_server.server_id(socket.gethostname(), b.server_address[1])[:-8]
    assert "another server (%s" % place in row


@redis
def test_a_message_reaches_students_on_the_other_server(two_rooms):
    a, b, alice, bob = two_rooms
    alice.send("hello from lab A")
    bob.expect_next("alice says: hello from lab A")


@redis
def test_three_servers_show_every_event_in_one_order(linked, join):
    servers = [linked(), linked(), linked()]
    watchers = [join(server, "watcher%d" % number) for number, server in enumerate(servers)]
    alice, bob = join(servers[0], "alice"), join(servers[1], "bob")
    for watcher in watchers:
        watcher.expect("*** bob joined the chat.")
    lines = 30
    burst = {sender: b"".join(b"%s %d\r\n" % (sender.encode(), number)
                              for number in range(lines)) for sender in ("alice", "bob")}
    alice.send_raw(burst["alice"])  # both at once: the servers race to Redis
    bob.send_raw(burst["bob"])
    seen = [read_messages(watcher, 2 * lines) for watcher in watchers]
    assert seen[0] == seen[1] == seen[2]
    assert len(seen[0]) == 2 * lines


@redis
def test_a_name_is_unique_across_servers(linked, join):
    a, b = linked(), linked()
    join(a, "Alice")
    newcomer = ChatClient(b.server_address)
    try:
        newcomer.send("alice")
        newcomer.expect("The name Alice is taken.")
    finally:
        newcomer.close()


@redis
def test_two_students_giving_one_name_at_once_on_one_server_are_not_both_let_in(
        linked, clients):
    """Redis says the name is this server's for both claims: the room checks again."""
    a = linked()
    real_claim, first_asked, second_in = a._link.claim_name, threading.Event(), \
        threading.Event()

    def claim_name(name, key, own=None):
        if not first_asked.is_set():
            first_asked.set()
            second_in.wait(TIMEOUT)  # the first claim is answered after the second join
        return real_claim(name, key, own)

    a._link.claim_name = claim_name
    first = ChatClient(a.server_address)
    clients.append(first)
    first.send("alice")
    assert first_asked.wait(TIMEOUT)
    clients.append(joined_on(a, "alice"))
    second_in.set()
    first.expect("*** The name alice is taken.")


@redis
def test_a_name_is_free_on_every_server_once_its_student_leaves(join, two_rooms):
    a, b, alice, bob = two_rooms
    alice.send("/quit")
    # Word for word: a leave without a reason shows none, on the other server too.
    assert bob.expect("*** alice left the chat.") == "*** alice left the chat."
    join(b, "alice")


@redis
def test_a_rename_is_seen_everywhere_and_frees_the_old_name(join, two_rooms):
    a, b, alice, bob = two_rooms
    alice.send("/nick alicia")
    bob.expect_next("*** alice is now alicia.")
    join(b, "alice")


@redis
def test_who_lists_the_students_of_every_server(linked, join):
    a, b = linked(), linked()
    join(a, "alice")
    bob = join(b, "bob")
    wait_known(b, "alice")
    bob.send("/who")
    bob.expect_next("*** Online now (2): alice, bob")


@redis
def test_a_newcomer_sees_the_history_of_every_server(linked, two_rooms):
    a, b, alice, bob = two_rooms
    alice.send("from A")
    bob.expect("from A")
    bob.send("from B")
    alice.expect("from B")
    late = linked()  # a server started later loads the history from Redis
    carol = ChatClient(late.server_address)
    try:
        carol.send("carol")
        history = lines_until(carol, "Online now")
        assert "alice says: from A" in history and "bob says: from B" in history
        assert history.index("alice says: from A") < history.index("bob says: from B")
        assert "*** Online now (3): alice, bob, carol" in history
    finally:
        carol.close()


def leaves_of(name):
    """For hold_back_stream(): the leave of name."""
    return lambda event: event["k"] == "leave" and event["name"] == name


@redis
def test_a_newcomer_listing_someone_whose_join_is_still_on_its_way_is_not_told_again(
        linked, join):
    a = linked()
    let_through = hold_back_stream(a, joins_of("bob"))
    bob = join(a, "bob", settle=False)  # bob's join has not come back from Redis
    carol = join(a, "carol", settle=False)
    assert carol.seen[-1] == "*** Online now (2): bob, carol"
    let_through.set()
    bob.send("now")
    assert "*** bob joined the chat." not in lines_until(carol, "bob says: now")


@redis
def test_a_split_does_not_tell_a_newcomer_of_a_join_its_list_counted(
        linked, join, proxies, quick_split):
    proxy = proxies()
    a = linked(via=proxy)
    let_through = hold_back_stream(a, joins_of("bob"))
    bob = join(a, "bob", settle=False)
    carol = join(a, "carol", settle=False)
    assert carol.seen[-1] == "*** Online now (2): bob, carol"
    proxy.freeze()  # the join is shown here at the split, not when it comes back
    assert "*** bob joined the chat." not in lines_until(
        carol, chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    bob.send("now")
    assert "*** bob joined the chat." not in lines_until(carol, "bob says: now")
    let_through.set()


@redis
def test_a_newcomer_not_listing_someone_whose_leave_is_still_on_its_way_is_not_told(
        linked, join):
    a = linked()
    alice, bob = join(a, "alice"), join(a, "bob")
    let_through = hold_back_stream(a, leaves_of("bob"))
    bob.send("/quit")
    wait_until(lambda: "bob" not in a.who(), message="bob gone here")
    carol = join(a, "carol", settle=False)
    assert carol.seen[-1] == "*** Online now (2): alice, carol"
    let_through.set()
    alice.expect("*** bob left the chat.")
    alice.send("now")
    assert "*** bob left the chat." not in lines_until(carol, "alice says: now")


@redis
def test_a_private_message_reaches_a_student_on_another_server(linked, join):
    a, b = linked(), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    wait_known(b, "alice")
    bob.send("/msg alice meet at the lab door")
    bob.expect_next("*** You whispered to alice: meet at the lab door")
    alice.expect("bob whispers: meet at the lab door")


def joins_of(name):
    """For hold_back_stream(): the join of name."""
    return lambda event: event["k"] == "join" and event["name"] == name


def hold_back_stream(server, wanted):
    """Make server's reader show a batch of events that holds one wanted(event) is
    true of only once the returned Event is set (or TIMEOUT has passed)."""
    let_through, real_apply = threading.Event(), server._link.apply

    def apply(events):
        if any(wanted(event) for event in events):
            let_through.wait(TIMEOUT)
        real_apply(events)

    server._link.apply = apply
    return let_through


def hold_stream_until_whispered(server):
    """Make server's reader show the stream only after its listener took a whisper
    (or a few seconds passed): the whisper's pub/sub then wins the race."""
    whispered = threading.Event()
    real_act, real_apply = server._link._act_on_private, server._link.apply

    def act(event):
        real_act(event)
        whispered.set()

    def apply(events):
        if any(event.get("k") == "say" for event in events):
            whispered.wait(TIMEOUT / 2)
        real_apply(events)

    server._link._act_on_private, server._link.apply = act, apply
    return whispered


@redis
def test_a_chat_line_after_a_whisper_comes_after_it_on_another_server(two_rooms):
    """The other server reads the line from the stream before its listener has the
    whisper: the stream waits at the whisper's mark."""
    a, b, alice, bob = two_rooms
    line_read, real_apply, real_act = threading.Event(), b._link.apply, b._link._act_on_private

    def apply(events):  # read: the line after the whisper, or the whisper's mark
        if any(event["k"] == "mark" or event["k"] == "say" and event["texts"] == ["after"]
               for event in events):
            line_read.set()
        real_apply(events)

    def act(event):  # the whisper is acted on only once the stream has got that far
        if event["k"] == "whisper":
            line_read.wait(TIMEOUT)
        real_act(event)

    b._link.apply, b._link._act_on_private = apply, act
    alice.send("before\n/msg bob psst\nafter")
    bob.expect_next("alice says: before")
    bob.expect_next("alice whispers: psst")
    bob.expect_next("alice says: after")
    assert line_read.is_set()  # the stream was read that far first


@redis
def test_a_whisper_after_a_chat_line_comes_after_it_on_another_server(two_rooms):
    a, b, alice, bob = two_rooms
    whispered = hold_stream_until_whispered(b)
    alice.send("hello all\n/msg bob psst")
    bob.expect_next("alice says: hello all")
    bob.expect_next("alice whispers: psst")
    assert whispered.is_set()  # the whisper did arrive first


@redis
def test_a_whisper_after_a_chat_line_comes_after_it_on_the_same_server(linked, join):
    a = linked()
    alice, bob = join(a, "alice"), join(a, "bob")
    bob_side = a.find("bob")
    real_queue_line, whispered_early = bob_side.queue_line, []

    def queue_line(text):  # what bob is given, noting a whisper before the line
        if "whispers" in text and a._link._pending:
            whispered_early.append(text)
        return real_queue_line(text)

    bob_side.queue_line = queue_line
    alice.send("hello all\n/msg bob psst")
    bob.expect_next("alice says: hello all")  # (the chat line waits for Redis)
    bob.expect_next("alice whispers: psst")
    alice.expect("*** You whispered to bob: psst")
    assert not whispered_early


def gate_the_reader(server):
    """Park server's stream reader before its next XREAD until release is set, so
    that what is sent meanwhile is read in one batch. Return (parked, release)."""
    parked, release = threading.Event(), threading.Event()
    real_read = server._link._read_events

    def read_events(connection):
        if not release.is_set():
            parked.set()
            release.wait(TIMEOUT)
        real_read(connection)

    server._link._read_events = read_events
    return parked, release


@redis
def test_a_browser_student_and_a_terminal_student_on_two_linked_servers_chat(linked, join):
    """The page's WebSocket is one more kind of client: linked, it is one room too."""
    a, b = linked(), linked()
    bob = join(b, "bob")
    alice = ChatSocket(*a.server_address[:2])
    try:
        alice.join("alice")
        bob.expect_next("*** alice joined the chat.")
        alice.send("hello from a browser")
        bob.expect_next("alice says: hello from a browser")
        bob.send("hi alice")
        alice.expect("bob says: hi alice")
        bob.send("/msg alice psst")
        alice.expect_next("bob whispers: psst")
        alice.send("/who")
        alice.expect_next("*** Online now (2): alice, bob")
    finally:
        alice.shutdown()
    bob.expect("*** alice left the chat.")


def park_the_writer(server):
    """Park server's Redis writer thread as it next waits for work, until release
    is set. Return (parked, release)."""
    parked, release = threading.Event(), threading.Event()
    wake = server._link._wake
    real_wait = wake.wait

    def wait(timeout=None):
        if not release.is_set():
            parked.set()
            release.wait(TIMEOUT)
        return real_wait(timeout)

    wake.wait = wait
    return parked, release


@redis
def test_a_chat_line_goes_to_redis_from_the_thread_that_read_it(linked, join):
    """No wait for the writer thread to wake: it only reads Redis's answers."""
    a, b = linked(), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    alice.expect("bob joined")
    parked, release = park_the_writer(a)
    try:
        assert parked.wait(TIMEOUT), "the writer did not park"
        alice.send("hello")
        bob.expect_next("alice says: hello")
        alice.send("/me waves")
        bob.expect_next("* alice waves")
    finally:
        release.set()


@redis
@pytest.mark.skipif(sys.platform != "linux", reason="shrinks the buffers of open sockets, "
                    "as Linux allows")
def test_lines_the_socket_to_a_slow_redis_could_not_take_go_later_in_order(
        linked, join, proxies, monkeypatch):
    """What send_outbox() leaves unsent, the writer sends after it, waiting for Redis."""
    monkeypatch.setattr(chat_server.RedisLink, "silence_seconds", 30.0)  # slow, not split
    monkeypatch.setattr(chat_server.RedisLink, "heartbeat_ttl_seconds", 60)  # nor dead
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    alice.expect("bob joined")
    parked, release = park_the_writer(a)
    try:
        assert parked.wait(TIMEOUT), "the writer did not park"
        with a._link._send_lock:  # small buffers on the way to Redis: they fill at once
            a._link._redis.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for inside, _ in proxy.pairs:
            inside.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        proxy.freeze()
        for number in range(100):
            alice.send("line %d %s" % (number, "x" * 900))
        wait_until(lambda: a._link._redis._unsent, message="lines the socket did not take")
    finally:
        release.set()
    proxy.resume()
    seen = lines_until(bob, "alice says: line 99 ")
    assert [line.split()[3] for line in seen if line.startswith("alice says: line ")] == [
        str(number) for number in range(100)]
    assert chat_server.SPLIT_LINE not in seen


@redis
def test_a_chat_line_after_a_whisper_does_not_overtake_it(linked, join):
    """hello, a whisper, bye: read from the stream in one batch, the whisper still
    comes between them (it waits for hello, and bye waits for nothing)."""
    a, b = linked(), linked()
    alice, boba = join(a, "alice"), join(a, "boba")
    bobb = join(b, "bobb")
    wait_known(a, "bobb")
    gates = [gate_the_reader(server) for server in (a, b)]
    for parked, _ in gates:
        assert parked.wait(TIMEOUT), "the reader did not park"
    alice.send("hello\n/msg boba secret a\n/msg bobb secret b\nbye")
    wait_until(lambda: len(a._link._pending) == 2
               and a._link._last_added[0] >= max(a._link._pending),
               message="hello and bye both in the stream")
    for _, release in gates:
        release.set()
    for bob, secret in ((boba, "a"), (bobb, "b")):
        read = [bob.expect("alice says: hello"), bob.expect_next(""), bob.expect_next("")]
        assert read[1:] == ["alice whispers: secret " + secret, "alice says: bye"], read


@redis
def test_a_whisper_waits_for_no_line_that_was_said_before_this_server_began(
        linked, join):
    a = linked()
    alice = join(a, "alice")  # her join is in the stream before b begins to read
    b = linked()
    bob = join(b, "bob")
    wait_known(a, "bob")
    b._link.silence_seconds = TIMEOUT * 10  # a wait for it would outlast the test
    alice.send("/msg bob you are new here")
    bob.expect_next("alice whispers: you are new here")


@redis
def test_a_whisper_to_someone_who_just_changed_name_elsewhere_is_owned_up_to(two_rooms):
    a, b, alice, bob = two_rooms
    parked, release = gate_the_reader(a)  # a does not hear of the rename yet
    try:
        assert parked.wait(TIMEOUT), "the reader did not park"
        bob.send("/nick robert")
        wait_known(b, "robert")
        alice.send("/msg bob are you there?")
        alice.expect("*** Your whisper to bob did not arrive: they had just left or "
                     "changed name.")
    finally:
        release.set()


@redis
def test_a_split_shows_a_held_whisper_between_the_lines_around_it(linked, join):
    a = linked()
    alice, bob = join(a, "alice"), join(a, "bob")
    stalled = threading.Event()

    def send_nothing(until):  # Redis gets nothing from here on
        stalled.set()
        a._link._stopping.wait(0.05)

    a._link.send_outbox = lambda: None  # from the students' threads either
    a._link._send_work = send_nothing
    assert stalled.wait(TIMEOUT), "the writer did not stall"  # (done with any real send)
    alice.send("one\n/msg bob psst\ntwo")
    wait_until(lambda: len(a._link._pending) == 2 and len(a._link._held) == 1,
               message="two lines on their way, the whisper held")
    a._link.split("a test")
    bob.expect_next("alice says: one")
    bob.expect_next("alice whispers: psst")
    bob.expect_next("alice says: two")


@redis
def test_a_whisper_held_for_someone_who_leaves_meanwhile_is_owned_up_to(two_rooms):
    a, b, alice, bob = two_rooms
    with b._lock:  # as if alice's earlier line were still on its way to b
        b._link._last_seen[a._link.server_id] = 0
        b._link._read_from = (0, 0)
    parked, release = gate_the_reader(b)
    try:
        assert parked.wait(TIMEOUT), "the reader did not park"
        alice.send("/msg bob psst")
        wait_until(lambda: b._link._held, message="the whisper held on b")
        bob.close()
        wait_until(lambda: b.find("bob") is None, message="bob gone from b")
    finally:
        release.set()
    alice.expect("*** Your whisper to bob did not arrive: they had just left or "
                 "changed name.")


@redis
def test_a_whisper_waiting_for_a_line_that_never_comes_is_shown_anyway(
        linked, join, quick_split):
    a = linked()
    bob = join(a, "bob")
    bob_side = a.find("bob")
    with a._lock:  # as if from a server whose chat line will never reach Redis
        assert a._link.hold_private([(bob_side, "ghost whispers: still here")],
                                    "f" * 16, 5)
    bob.expect_next("ghost whispers: still here")


@redis
def test_a_private_message_is_never_stored_in_redis(linked, join, redis_server):
    a, b = linked(), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    wait_known(b, "alice")
    bob.send("/msg alice the secret word")
    alice.expect("the secret word")
    connection = redis_server.connect()
    try:
        keys = connection.call("KEYS", "*")
        stored = b"".join(b"".join(map(repr_bytes, connection.call("XRANGE", key, "-", "+")))
                          for key in keys if connection.call("TYPE", key) == "stream")
    finally:
        connection.close()
    assert b"secret word" not in stored


def repr_bytes(item):
    return repr(item).encode()


@redis
def test_the_teacher_announces_from_any_server(linked, join):
    a, b = linked(), linked()
    join(a, "alice")
    bob = join(b, "bob")
    a.announce("Pens down, please.")
    bob.expect_next("*** [teacher] Pens down, please.")


@redis
def console_who(server, caplog):
    """The lines of the console's /who on server, once its whole table is shown."""
    start = len(caplog.records)
    TeacherConsole(server, None).handle_line("/who")

    def table():
        lines = [record.getMessage() for record in caplog.records[start:]]
        head = next((line for line in lines if " online" in line and "not joined" in line),
                    None)
        if head is None:
            return None
        rows = sum(int(number) for number in re.findall(r"(\d+) (?:online|on other)", head))
        rest = lines[lines.index(head) + 1:]
        return lines if len(rest) >= rows + (1 if rows else 0) else None

    wait_until(table, message="the /who table")
    return table()


@redis
def test_the_teacher_kicks_a_student_on_another_server(caplog, two_rooms):
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/kick bob too loud")
    expect_console(caplog, "Asked the server of bob to kick them.")
    expect_console(caplog, "Another server's teacher: /kick bob too loud")  # b's console
    bob.expect("removed you from the chat: too loud")
    bob.expect_closed()
    alice.expect("*** bob left the chat.")
    again = ChatClient(b.server_address)  # the ban is on bob's own server
    try:
        again.expect("You were removed by the teacher")
    finally:
        again.close()


@redis
def test_a_kick_for_another_server_is_numbered_under_the_room_lock(
        caplog, two_rooms, monkeypatch):
    """Other servers skip a number they have seen: numbered without the lock, while a
    student's line takes the next number, the kick could give a number out twice."""
    a, b, alice, bob = two_rooms
    real_stamp, unlocked = a._link._stamp, []

    def stamp(event):
        if not a._lock.locked():  # nobody else holds it in this quiet room
            unlocked.append(event["k"])
        return real_stamp(event)

    monkeypatch.setattr(a._link, "_stamp", stamp)
    TeacherConsole(a, None).handle_line("/kick bob too loud")
    bob.expect_closed()
    alice.expect("*** bob left the chat.")
    assert unlocked == []


@redis
def test_the_teacher_mutes_a_student_on_another_server(linked, join, caplog):
    a, b = linked(), linked()
    alice = join(a, "alice")
    bob, bea = join(b, "bob"), join(b, "bea")
    alice.expect("bea joined")
    TeacherConsole(a, None).handle_line("/mute bob")
    expect_console(caplog, "Asked the server of bob to mute them.")
    bob.expect("The teacher has muted you")
    bob.send("can anyone hear me")
    alice.expect_nothing_before(bea, "bea is not muted")


@redis
def test_the_teachers_who_shows_a_student_muted_on_another_server_as_muted(
        linked, join, caplog):
    a, b = linked(), linked()
    join(a, "alice")
    bob = join(b, "bob")
    join(b, "bea")
    TeacherConsole(a, None).handle_line("/mute bob")
    bob.expect("The teacher has muted you")

    def only_bob_shown_muted():
        rows = {line.split()[0]: line for line in console_who(a, caplog)
                if line.startswith(("bob ", "bea "))}
        return rows.get("bob", "").endswith(" muted") and \
            not rows.get("bea", " muted").endswith(" muted")

    wait_until(only_bob_shown_muted, message="bob, not bea, shown muted on a's /who")


@redis
def test_a_name_muted_on_one_server_is_told_muted_at_once_on_another_and_so_is_its_teacher(
        linked, join, caplog):
    """A mute follows the name: whoever comes under it is told at once, not when
    they first speak, and so is that server's teacher, who can lift it."""
    a, b = linked(), linked()
    hanna = join(a, "hanna")
    TeacherConsole(a, None).handle_line("/mute hanna")
    expect_console(caplog, "; and the name hanna on every linked server.")
    hanna.expect("The teacher has muted you")
    hanna.close()
    wait_until(lambda: "hanna" not in b.who(), message="hanna gone from b")
    again = join(b, "hanna")
    again.expect_next(chat_server.MUTED_LINE)
    expect_console(caplog, "hanna joined muted (/unmute hanna lifts it).")


@redis
def test_quiet_mode_from_one_server_silences_students_on_another(two_rooms):
    a, b, alice, bob = two_rooms
    a.set_quiet(True)
    bob.expect("Quiet, please")
    alice.expect("Quiet, please")
    bob.send("psst")
    bob.expect_next("*** Not sent: the room is quiet")
    a.set_quiet(False)
    bob.expect("The chat is open again.")
    alice.expect("The chat is open again.")
    bob.send("thanks")
    alice.expect_next("bob says: thanks")


@redis
def test_the_teachers_who_lists_students_on_other_servers(linked, join, caplog):
    a, b = linked(), linked()
    join(a, "alice")
    join(b, "bob")
    wait_until(lambda: len(a.snapshot()[2]) == 1, message="bob in A's roster")
    lines = console_who(a, caplog)
    assert "1 online, 1 on other servers, 0 not joined yet." in lines
    assert any(line.startswith("bob") and "another server" in line for line in lines)


@pytest.fixture
def transcripts(tmp_path):
    """Two open transcripts; closed after the servers (ask for this fixture first)."""
    opened = [chat_server.Transcript(str(tmp_path / name)) for name in ("a.txt", "b.txt")]
    yield opened
    for transcript in opened:
        transcript.close()


@redis
def test_each_servers_transcript_records_the_whole_room(transcripts, linked, join):
    a, b = linked(transcript=transcripts[0]), linked(transcript=transcripts[1])
    alice = join(a, "alice")
    bob = join(b, "bob")
    alice.expect("bob joined")
    alice.send("from A")
    bob.send("from B")
    for transcript in transcripts:
        wait_until(lambda: all(text in read_text(transcript.path)
                               for text in ("alice says: from A", "bob says: from B")),
                   message="both messages in %s" % transcript.path)


def read_text(path):
    with open(path, encoding="utf-8") as reader:
        return reader.read()


def wait_in_transcript(transcript, *texts):
    wait_until(lambda: all(text in read_text(transcript.path) for text in texts),
               message="%r in %s" % (texts, transcript.path))


@redis
@pytest.mark.parametrize("command, asked, done", [
    ("/kick bob too loud", "asked the server of bob to kick them: too loud",
     "kicked bob: too loud"),
    ("/mute bob", "asked the server of bob to mute them", "muted bob"),
], ids=["kick", "mute"])
def test_a_kick_or_mute_from_another_servers_console_is_in_both_transcripts(
        transcripts, linked, join, command, asked, done):
    a, b = linked(transcript=transcripts[0]), linked(transcript=transcripts[1])
    join(a, "alice")
    join(b, "bob")
    TeacherConsole(a, None).handle_line(command)
    wait_in_transcript(transcripts[0], "[teacher] " + asked)
    wait_in_transcript(transcripts[1], "[teacher at another server] " + done)


@redis
def test_a_split_and_the_relink_are_in_the_transcript(transcripts, linked, join, proxies,
                                                       quick_split):
    proxy = proxies()
    a = linked(via=proxy, transcript=transcripts[0])
    amy = join(a, "amy")
    proxy.freeze()
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    proxy.thaw()
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    wait_in_transcript(transcripts[0], chat_server.SPLIT_LINE, chat_server.WHOLE_LINE)


@redis
def test_student_text_full_of_resp_is_just_text(redis_server, two_rooms):
    a, b, alice, bob = two_rooms
    alice.send_raw(b"*1\r\n$8\r\nFLUSHALL\r\n*3\r\n$3\r\nDEL\r\n$15\r\nclass:name:bob\r\n")
    for line in ("*1", "$8", "FLUSHALL", "*3", "$3", "DEL", "$15", "class:name:bob"):
        bob.expect_next("alice says: " + line)
    connection = redis_server.connect()
    try:
        assert connection.call("EXISTS", "class:name:bob") == 1
    finally:
        connection.close()


@redis
def test_a_bad_event_in_redis_is_logged_and_dropped(linked, join, redis_server, caplog):
    a = linked()
    alice, amy = join(a, "alice"), join(a, "amy")
    alice.expect("amy joined")
    connection = redis_server.connect()
    try:
        for bad in (b"{", event(k="announce", text="\x1b]0;owned\x07"),
                    event(k="say", name="mallory", texts=["I am not here"])):
            connection.call("XADD", "class:events", "*", "e", bad)
    finally:
        connection.close()
    alice.expect_nothing_before(amy)
    wait_until(lambda: sum("Dropped a bad event" in r.getMessage() or
                           "Dropped a message" in r.getMessage()
                           for r in caplog.records) == 3, message="three drops logged")


@redis
def test_our_own_event_refused_on_its_way_back_is_never_shown_even_at_a_split(
        linked, join, proxies, quick_split, caplog):
    """Else it would wait among the events on their way for good, and come out,
    late and out of order, at the next split."""
    proxy = proxies()
    a = linked(via=proxy)
    alice, bob = join(a, "alice"), join(a, "bob")
    real_xadd = a._link._xadd

    def xadd(event):  # spoiled in Redis, as a rogue writer there could
        if event.get("texts") == ["spoiled"]:
            event = dict(event, texts=["\x1b[2J spoiled"])
        return real_xadd(event)

    a._link._xadd = xadd
    alice.send("spoiled")
    expect_console(caplog, "Dropped a bad event from Redis")
    wait_until(lambda: not a._link._pending, message="the refused event forgotten")
    proxy.freeze()
    bob.expect_next(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    alice.send("after")
    bob.expect_next("alice says: after")


@redis
def test_a_whisper_refused_on_arrival_holds_back_no_line_after_it(two_rooms, caplog):
    """Its mark in the stream waits for it no more once the listener has refused it."""
    a, b, alice, bob = two_rooms
    b._link.silence_seconds = 60.0  # how long a mark would wait for it
    real_commands = a._link._commands_for

    def commands_for(item):  # the whisper spoiled on its way, as a rogue writer could
        if item[0] == "publish" and item[2].get("text") == "spoiled":
            item = (item[0], item[1], dict(item[2], text="\x1b[2J spoiled")) + item[3:]
        return real_commands(item)

    a._link._commands_for = commands_for
    alice.send("/msg bob spoiled")
    alice.send("after")
    bob.expect_next("alice says: after")
    expect_console(caplog, "Dropped a bad message from Redis")


@redis
def test_a_line_from_redis_that_shows_three_asterisks_is_dropped(two_rooms):
    """A rogue writer, or an older server, cannot show a student's *** here."""
    a, b, alice, bob = two_rooms
    forged = {"k": "say", "name": "bob", "texts": ["\u2731\u2731\u2731 [teacher] go home"],
              "s": b._link.server_id, "n": b._link._next_sequence + 1}
    redis = chat_server.RedisConnection(a._link.url)
    try:
        redis.call("XADD", a._link.stream, "*", "e", json.dumps(forged))
    finally:
        redis.close()
    bob.send("the real bob")
    alice.expect_next("bob says: the real bob")


@redis
def test_an_event_forged_in_our_name_does_not_hide_our_own_lines(redis_server, two_rooms):
    """A rogue writer's event with our server's id and a huge number is dropped: taken
    as ours, every line we send after it would look like one shown already."""
    a, b, alice, bob = two_rooms
    amy = joined_on(a, "amy")
    alice.expect("amy joined")
    forged = event(k="announce", text="forged", s=a._link.server_id, n=10 ** 18)
    connection = redis_server.connect()
    try:
        connection.call("XADD", a._link.stream, "*", "e", forged)
    finally:
        connection.close()
    alice.send("still heard")
    amy.expect("alice says: still heard")
    amy.close()


# --- Faults -------------------------------------------------------------------


@redis
def test_redis_unreachable_at_start_is_one_line_and_exit_2():
    find_tool("redis-server")
    url = "redis://127.0.0.1:%d/class" % free_port()
    result = subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "0", "--redis", url],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT * 2)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Cannot reach Redis at 127.0.0.1" in lines[0], lines


@redis
def test_a_wrong_redis_password_at_start_is_one_line_and_exit_2():
    protected = RedisServer(find_tool("redis-server"), password="right")
    try:
        url = protected.url(password="wrong")
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "0"],
                                stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=TIMEOUT * 2, env=redis_env(url))
    finally:
        protected.stop()
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "refused us: the password in the Redis URL is wrong" in lines[0], \
        lines


@redis
def test_the_start_says_who_is_in_the_room_and_names_the_other_rooms(
        redis_server, start_server, fast_link, clients, caplog):
    """A typo in the room name makes a room of its own: the start says so."""
    redis_server.connect().call("SET", "evil\x1b[2J:server:1", "1")  # no room name
    start_server(redis=redis_server.settings_url(room="Lesson"))
    expect_console(caplog, "No other server is in room Lesson yet.")
    lesson = start_server(redis=redis_server.settings_url(room="lesson"))
    expect_console(caplog, "No other server is in room lesson yet. Other rooms on this "
                           "Redis: Lesson.")
    clients.append(joined_on(lesson, "alice"))
    start_server(redis=redis_server.settings_url(room="lesson"))
    expect_console(caplog, "In the room already: 1 other server, with 1 student.")


@redis
def test_a_linked_server_with_the_right_password_starts(redis_server):
    protected = RedisServer(find_tool("redis-server"), password="right")
    try:
        with server_process("--redis", protected.url()) as process:
            assert any("Linked through Redis" in line for line in process.log_seen)
            process.join("alice")
    finally:
        protected.stop()


def alice_and_amy_behind_a_proxy_bob_direct(linked, join, proxies):
    """(proxy, a, b, alice, amy, bob): a linked through a proxy, b directly;
    alice and amy on a have read bob's join on b."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice, amy = join(a, "alice"), join(a, "amy")
    bob = join(b, "bob")
    for student in (alice, amy):
        student.expect("bob joined")
    return proxy, a, b, alice, amy, bob


@redis
def test_a_silent_redis_splits_the_room_and_the_local_room_goes_on(
        linked, join, proxies, quick_split):
    proxy, a, b, alice, amy, bob = alice_and_amy_behind_a_proxy_bob_direct(linked, join, proxies)
    proxy.freeze()
    alice.send("anyone there?")
    early = lines_until(amy, chat_server.SPLIT_LINE)  # pending events first, then the notice
    assert early[-2:] == ["alice says: anyone there?", chat_server.SPLIT_LINE]
    alice.send("still here")
    amy.expect_next("alice says: still here")
    amy.send("/who")
    amy.expect_next("*** Online now (2): alice, amy")
    assert alice.expect("out of reach") == chat_server.SPLIT_LINE
    alice.expect_nothing_before(amy)  # told once, not once per line
    bob.send("/who")
    bob.expect("Online now")  # B's room goes on too
    assert "anyone there?" not in " ".join(bob.seen)


@redis
def test_a_line_said_as_the_link_froze_is_not_replayed_elsewhere_after_the_relink(
        linked, join, proxies, quick_split):
    """Shown on its own server at the split, it is not sent to the others after it."""
    proxy, a, b, alice, amy, bob = alice_and_amy_behind_a_proxy_bob_direct(linked, join, proxies)
    proxy.freeze()
    alice.send("anyone there?")  # sent to Redis, before the split is known...
    wait_until(lambda: a._link._in_flight, message="the line on its way to Redis")
    alice.send("hello?")  # ...and queued for it behind that
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    proxy.thaw()
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.send("back")
    seen = lines_until(bob, "alice says: back")
    assert "alice says: anyone there?" not in seen and "alice says: hello?" not in seen


@redis
def test_a_bad_event_in_the_history_a_server_loads_is_logged_and_left_out(
        redis_server, linked, caplog):
    linked()  # the lesson has begun: a later server loads its history
    connection = redis_server.connect()
    try:
        connection.call("XADD", "class:events", "*", "e",
                        event(k="say", name="mallory", texts=["\x1b[2J"]))
    finally:
        connection.close()
    late = linked()
    expect_console(caplog, "Dropped a bad event from Redis's history")
    assert "\x1b" not in "".join(late._history)


@redis
def test_a_stuck_redis_never_stalls_the_local_room(linked, join, proxies, monkeypatch):
    monkeypatch.setattr(chat_server.RedisLink, "silence_seconds", 30.0)  # no split by time
    monkeypatch.setattr(chat_server.RedisLink, "work_items", 5)
    proxy = proxies()
    a = linked(via=proxy)
    alice, amy = join(a, "alice"), join(a, "amy")
    alice.expect("amy joined")
    proxy.freeze()
    started = time.monotonic()
    # Each /me is an event of its own: more than the queue to Redis holds.
    alice.send_raw(b"".join(b"/me waves %d\r\n" % number for number in range(20)))
    seen = lines_until(amy, "* alice waves 19")  # the full queue splits the room
    assert [line for line in seen if "waves" in line] == [
        "* alice waves %d" % number for number in range(20)]  # nothing lost, in order
    assert chat_server.SPLIT_LINE in seen
    assert time.monotonic() - started < 3.0
    amy.send("/who")
    amy.expect("Online now (2)")


@redis
def test_the_room_is_whole_again_after_the_link_comes_back(linked, join, proxies, quick_split):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    alice.expect("bob joined")
    proxy.freeze()
    alice.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    proxy.thaw()
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect_next("*** Online now (2): alice, bob")
    bob.send("welcome back")
    alice.expect("bob says: welcome back")
    alice.send("thanks")
    # Next: b never lost alice, so her rejoin at the relink shows nothing there.
    bob.expect_next("alice says: thanks")


@redis
def test_who_came_and_went_elsewhere_during_a_split_is_told_at_the_relink(
        split_rooms, join):
    """amy's server never reads the stream's events of the split: at the relink it
    tells its students who left and who joined meanwhile, before who is online."""
    proxy, a, b, amy, bob = split_rooms
    carol = join(b, "carol", settle=False)
    bob.expect("*** carol joined the chat.")
    bob.close()
    carol.expect("*** bob left the chat.")
    proxy.thaw()
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect_next("*** bob left the chat.")
    amy.expect_next("*** carol joined the chat.")
    amy.expect_next("*** Online now (2): amy, carol")
    carol.send("hello amy")
    amy.expect_next("carol says: hello amy")  # and no second join line before it


@redis
def test_a_student_who_leaves_during_a_split_leaves_the_other_servers_at_the_relink(
        split_rooms):
    proxy, a, b, amy, bob = split_rooms
    amy.close()  # a is on its own: b is not told now
    wait_until(lambda: a.find("amy") is None, message="amy gone from a")
    proxy.thaw()
    bob.expect("*** amy left the chat.", timeout=SPLIT_TIMEOUT)
    assert b.snapshot()[2] == []  # nobody elsewhere


@redis
def test_a_new_case_taken_elsewhere_during_a_split_is_told_as_a_rename_at_the_relink(
        split_rooms):
    proxy, a, b, amy, bob = split_rooms
    bob.send("/nick Bob")
    bob.expect("*** bob is now Bob.")
    proxy.thaw()
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect_next("*** bob is now Bob.")
    amy.expect_next("*** Online now (2): amy, Bob")


@redis
def test_a_whisper_to_a_server_cut_off_that_never_came_is_owned_up_to_at_its_relink(
        split_rooms):
    """Redis handed it to a's channel, frozen, then cut: b never knew. a finds its
    mark in the stream at the relink, and tells b, which tells bob."""
    proxy, a, b, amy, bob = split_rooms
    bob.send("/msg amy are you there?")
    bob.expect("*** You whispered to amy: are you there?")
    wait_until(lambda: not b._link._outbox and not b._link._in_flight,
               message="the whisper and its mark sent")
    proxy.thaw()  # a's connections are cut: what Redis sent into them is gone
    bob.expect("*** Your whisper to amy may not have arrived", timeout=SPLIT_TIMEOUT)


@redis
def test_a_leave_on_its_way_to_redis_as_the_split_came_is_told_at_the_relink(
        linked, join, proxies, quick_split):
    """ann left in the moment before a noticed the silence: her leave, sent to a
    frozen Redis, was shown on a and lost for b."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    amy, ann = join(a, "amy"), join(a, "ann")
    bob = join(b, "bob")
    proxy.freeze()
    ann.close()
    amy.expect("*** ann left the chat.")
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    proxy.thaw()
    bob.expect("*** ann left the chat.", timeout=SPLIT_TIMEOUT)
    assert [student.name for student in b.snapshot()[2]] == ["amy"]


@redis
def test_a_leave_sent_at_the_relink_leaves_a_name_claimed_elsewhere_since(
        split_rooms, redis_server):
    """zoe joined and left a during its split, while another zoe joined b."""
    proxy, a, b, amy, bob = split_rooms
    zoe_a = joined_on(a, "zoe")
    zoe_a.close()
    wait_until(lambda: a.find("zoe") is None, message="zoe gone from a")
    zoe_b = joined_on(b, "zoe")
    try:
        proxy.thaw()
        amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)  # a's leave is queued
        wait_until(lambda: not a._link._outbox and not a._link._in_flight,
                   message="a's leave of zoe sent")
        redis = redis_server.connect()
        try:
            holder = json.loads(redis.call("GET", b._link._name_prefix + "zoe"))
        finally:
            redis.close()
        assert holder["server"] == b._link.server_id
    finally:
        zoe_b.close()


@redis
def test_a_whisper_that_comes_through_after_a_cut_is_not_owned_up_to(
        linked, join, proxies, quick_split):
    """Nobody heard it (a's channel was cut): b sent it again until a had it, so a's
    report of its mark, read at the relink, must not say it may be lost."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    amy = join(a, "amy")
    bob = join(b, "bob")
    proxy.refusing = True
    proxy.cut()
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    bob.send("/msg amy are you there?")
    bob.expect("*** You whispered to amy: are you there?")
    wait_until(lambda: not b._link._outbox and not b._link._in_flight,
               message="the whisper and its mark sent")
    proxy.refusing = False
    amy.expect("bob whispers: are you there?", timeout=SPLIT_TIMEOUT)
    # a's listener may hear it before a's writer has relinked and knows bob again.
    wait_until(lambda: a._link.linked and "bob" in a._remote, timeout=SPLIT_TIMEOUT,
               message="a relinked")
    amy.send("/msg bob yes")  # comes after any report of a's about that mark
    bob.expect("amy whispers: yes", timeout=SPLIT_TIMEOUT)
    assert not [line for line in bob.seen if "may not have arrived" in line]


@redis
def test_a_lost_report_numbered_by_another_server_keeps_our_whisper_of_that_number(
        two_rooms):
    """A "lost" carries the number its own server gave it: it names no whisper of ours."""
    a, b, alice, bob = two_rooms
    ours = {"k": "whisper", "name": "alice", "to": "bob", "text": "x",
            "s": a._link.server_id, "n": 7}
    with a._lock:
        a._link._whispers_sent[7] = time.monotonic(), ours, b._link.server_id
    a._link._own_up([{"k": "whisper", "name": "nobody", "to": "bob",
                      "s": b._link.server_id, "n": 7}], "did not arrive")
    assert 7 in a._link._whispers_sent


@redis
def test_a_server_that_stops_leaves_alone_a_name_another_server_holds(
        two_rooms, redis_server):
    a, b, alice, bob = two_rooms
    key = a._link._name_prefix + "alice"
    redis = redis_server.connect()
    try:
        redis.call("SET", key, json.dumps({"name": "alice", "server": b._link.server_id}))
        a.close_room()
        assert json.loads(redis.call("GET", key))["server"] == b._link.server_id
    finally:
        redis.close()


@redis
def test_a_whisper_held_in_a_frozen_channel_through_a_split_is_not_owned_up_to(
        split_rooms, caplog):
    """a's channel kept it through the stall; at the relink, a's listener may not
    have read it yet: a must look again before saying it was missed."""
    proxy, a, b, amy, bob = split_rooms
    real_listen, held = a._link._listen, threading.Event()

    def listen(connection):  # a's listener reads nothing more before the relink is done
        held.set()
        wait_until(lambda: "Linked through Redis again" in caplog.text,
                   timeout=SPLIT_TIMEOUT, message="the relink")
        real_listen(connection)

    a._link._listen = listen
    wait_until(held.is_set, message="a's listener held")
    bob.send("/msg amy are you there?")
    bob.expect("*** You whispered to amy: are you there?")
    wait_until(lambda: not b._link._outbox and not b._link._in_flight,
               message="the whisper and its mark sent")
    proxy.resume()  # the same connections: the channel brings it now
    amy.expect("bob whispers: are you there?", timeout=SPLIT_TIMEOUT)
    wait_until(lambda: a._link.linked and not a._link._missed_marks,
               timeout=SPLIT_TIMEOUT, message="a to look for missed whispers")
    amy.send("/msg bob yes")  # comes after any report of a's about that mark
    bob.expect("amy whispers: yes", timeout=SPLIT_TIMEOUT)
    assert not [line for line in bob.seen if "may not have arrived" in line]


@redis
def test_owning_up_to_work_lost_in_a_split_passes_over_a_missed_report(two_rooms):
    """A report of a missed whisper is an answer: nobody to own up to it (it raised
    KeyError, which killed the link's writer in a split)."""
    a, b, alice, bob = two_rooms
    a._link._own_up([{"k": "missed", "m": 1, "s": b._link.server_id, "n": 9}], "lost")


@redis
def test_a_rename_elsewhere_during_a_split_is_told_as_a_rename_at_the_relink(split_rooms):
    """bob renamed on b while a was cut off: amy hears bob is now bobby, not that
    bob left and bobby joined."""
    proxy, a, b, amy, bob = split_rooms
    bob.send("/nick bobby")
    bob.expect("*** bob is now bobby.")
    proxy.thaw()
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect_next("*** bob is now bobby.")
    amy.expect_next("*** Online now (2): amy, bobby")


@redis
def test_a_rename_told_at_the_relink_is_not_taken_for_a_stranger_when_it_comes_back(
        split_rooms, caplog):
    """a reads back the rename it sent the others for amy: shown here already,
    it is no rename "of a student we do not know" on a's console."""
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick amelia")
    amy.expect("*** amy is now amelia.")
    proxy.thaw()
    bob.expect("*** amy is now amelia.", timeout=SPLIT_TIMEOUT)
    link = a._link
    wait_until(lambda: link._last_seen.get(link.server_id, 0) >= link._next_sequence,
               message="a to read back what it sent")
    assert not [line for line in console_lines(caplog) if "Dropped" in line]


@redis
def test_a_rename_during_a_split_is_told_as_a_rename_at_the_relink(split_rooms):
    """The others knew amy: amy is now amelia, not amy left and amelia joined."""
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick amelia")
    amy.expect("*** amy is now amelia.")
    amy.send("/nick Amelia")  # twice: the others hear of it once, from the first name
    amy.expect("*** amelia is now Amelia.")
    before = len(bob.seen)
    proxy.thaw()
    bob.expect("*** amy is now Amelia.", timeout=SPLIT_TIMEOUT)
    bob.send("hello Amelia")
    amy.expect("bob says: hello Amelia", timeout=SPLIT_TIMEOUT)
    assert not [line for line in bob.seen[before:] if "joined" in line or "left" in line]


@redis
def test_a_name_taken_during_a_split_and_renamed_at_the_relink_leaves_no_ghost(split_rooms):
    """amy took the name bob while a was alone; bob had it on b, so at the relink
    she becomes bob.2: b must hear amy is now bob.2, and list no amy any more."""
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick bob")
    amy.expect("*** amy is now bob.")
    proxy.thaw()
    amy.expect("you are now bob.2", timeout=SPLIT_TIMEOUT)
    bob.expect("*** amy is now bob.2.", timeout=SPLIT_TIMEOUT)
    wait_until(lambda: [student.name for student in b.snapshot()[2]] == ["bob.2"],
               message="b to list bob.2 alone elsewhere")


@redis
def test_a_student_renamed_at_a_relink_is_told_after_the_room_is_whole_again(
        split_rooms, join):
    proxy, a, b, amy, bob = split_rooms
    cal = join(a, "cal", settle=False)
    amy.send("/nick bob")
    cal.expect("*** amy is now bob.")
    proxy.thaw()
    assert chat_server.WHOLE_LINE in lines_until(amy, "you are now bob.2", SPLIT_TIMEOUT)
    assert chat_server.WHOLE_LINE in lines_until(cal, "*** bob is now bob.2.", SPLIT_TIMEOUT)


@redis
def test_a_student_renamed_at_a_relink_that_fails_is_told_at_once(split_rooms, monkeypatch):
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick bob")
    amy.expect("*** amy is now bob.")
    real_load, failed = a._link._load_roster, threading.Event()

    def load_roster():  # the link drops again after the names were claimed
        if not failed.is_set():
            failed.set()
            raise socket.timeout("Redis went silent again")
        return real_load()

    monkeypatch.setattr(a._link, "_load_roster", load_roster)
    proxy.thaw()
    told = lines_until(amy, "you are now bob.2", SPLIT_TIMEOUT)
    assert failed.is_set() and chat_server.WHOLE_LINE not in told
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)  # the next relink


@redis
def test_an_unmute_typed_with_separate_accents_reaches_the_other_servers(two_rooms, join,
                                                                          caplog):
    """The name is sent as the other servers check it (NFC), else all refuse it."""
    a, b, alice, bob = two_rooms
    jose = join(b, "Jos\u00e9")
    TeacherConsole(b, None).handle_line("/mute Jos\u00e9")
    jose.expect("The teacher has muted you")
    jose.close()
    wait_until(lambda: "Jos\u00e9" not in a.who(), message="Jose gone")
    TeacherConsole(a, None).handle_line("/unmute Jose\u0301")
    expect_console(caplog, "Another server's teacher unmuted Jos\u00e9.")  # b's console


@redis
def test_a_student_who_renames_then_leaves_during_a_split_leaves_by_the_name_known(
        split_rooms):
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick amelia")
    amy.expect("*** amy is now amelia.")
    amy.close()
    wait_until(lambda: a.find("amelia") is None, message="amelia gone from a")
    proxy.thaw()
    bob.expect("*** amy left the chat.", timeout=SPLIT_TIMEOUT)
    assert b.snapshot()[2] == []  # nobody elsewhere


@redis
def test_a_short_cut_of_the_link_loses_nothing(linked, join, proxies):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    alice.expect("bob joined")
    proxy.refusing = True
    proxy.cut()
    for number in range(5):
        bob.send("during the cut %d" % number)
    proxy.refusing = False  # back within the silence limit: no split
    for number in range(5):
        alice.expect_next("bob says: during the cut %d" % number)
    alice.send("and after")
    bob.expect_next("alice says: and after")
    assert chat_server.SPLIT_LINE not in alice.seen


@redis
def test_a_name_taken_during_a_split_becomes_name_dot_2(linked, join, proxies, quick_split):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice = join(a, "alice")
    bob = join(b, "bob")
    alice.expect("bob joined")
    proxy.freeze()
    alice.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    carol_a = join(a, "carol", settle=False)  # this room is on its own
    alice.expect("*** carol joined the chat.")
    carol_b = join(b, "carol", settle=False)
    proxy.thaw()
    carol_a.expect("took the name carol: you are now carol.2", timeout=SPLIT_TIMEOUT)
    alice.expect("*** carol is now carol.2.")
    bob.expect("*** carol.2 joined the chat.", timeout=SPLIT_TIMEOUT)
    carol_a.send("/who")
    names = carol_a.expect("Online now").split(": ", 1)[1].split(", ")
    assert sorted(names) == ["alice", "bob", "carol", "carol.2"]
    carol_b.send("hi carol.2")
    carol_a.expect("carol says: hi carol.2")


@redis
@pytest.mark.parametrize("way", ["join", "rename"])
def test_a_look_alike_of_a_student_on_another_server_is_refused(two_rooms, clients, way):
    """ᴀlice (a small capital) cannot pass for alice from the other server either."""
    a, b, alice, bob = two_rooms
    impostor = ChatClient(b.server_address)
    clients.append(impostor)
    if way == "rename":
        impostor.join("mallory")
        alice.expect_next("*** mallory joined the chat.")
        impostor.send("/nick \u1d00lice")
    else:
        impostor.send("\u1d00lice")
    impostor.expect("That name looks too much like alice, who is online.")
    bob.send("still one alice")
    alice.expect_next("bob says: still one alice")  # no join or rename line before it


@redis
@pytest.mark.parametrize("way", ["join", "rename"])
def test_look_alikes_given_on_two_servers_at_once_do_not_both_get_in(
        linked, join, clients, way):
    """Until alice's join is back from the stream, b knows nothing of her: her
    looks are held in Redis a moment, so aIice is refused on b all the same."""
    a, b = linked(), linked()
    bob = join(b, "bob")
    impostor = ChatClient(b.server_address)
    clients.append(impostor)
    if way == "rename":
        impostor.join("mallory")
        bob.expect("*** mallory joined the chat.")
    let_through = hold_back_stream(b, joins_of("alice"))
    try:
        join(a, "alice", settle=False)  # (b cannot know her yet)
        impostor.send("aIice" if way == "join" else "/nick aIice")
        impostor.expect("That name looks too much like alice, who is online.")
    finally:
        let_through.set()
    bob.expect("*** alice joined the chat.")
    assert b.find("aIice") is None


@redis
def test_a_claim_refused_as_a_look_alike_lets_go_of_the_looks_it_held(linked, join, clients):
    """aIice, refused beside alice, held "aiice" for five seconds: aıice (with a
    dotless i) looks like aIice, who never got in, and must not be refused."""
    a, b = linked(), linked()
    let_through = hold_back_stream(b, joins_of("alice"))
    try:
        join(a, "alice", settle=False)
        impostor, newcomer = ChatClient(b.server_address), ChatClient(b.server_address)
        clients.extend([impostor, newcomer])
        impostor.send("aIice")
        impostor.expect("That name looks too much like alice, who is online.")
        newcomer.send("a\u0131ice")
        newcomer.expect("*** Welcome, a\u0131ice!")
    finally:
        let_through.set()


@redis
def test_a_student_may_take_a_look_alike_of_the_name_they_just_joined_with(two_rooms, join):
    """aIan's looks are held a few seconds after the join: not against aIan."""
    a, b, alice, bob = two_rooms
    alan = join(a, "aIan", settle=False)
    alan.send("/nick alan")
    alan.expect("*** aIan is now alan.")


@redis
def test_whispers_marks_do_not_push_the_chat_out_of_a_newcomer_s_history(two_rooms, linked):
    """A mark is a stream entry that shows no line; a server started later reads
    back past them for its --history lines."""
    a, b, alice, bob = two_rooms
    alice.send("line one")
    for number in range(25):
        alice.send("/msg bob psst %d" % number)
    alice.send("line two")
    bob.expect("alice says: line two")  # after every whisper's mark, in the stream
    newcomer = joined_on(linked(), "newcomer")
    try:
        assert "alice says: line one" in newcomer.seen
    finally:
        newcomer.close()


@redis
def test_a_rename_refused_for_its_rate_does_not_hold_the_name(linked, join):
    """Claimed in Redis before the rate was checked, bob was held from every server."""
    a, b = linked(nick_rate=1), linked()
    mallory = join(a, "mallory")
    mallory.send("/nick mal")
    mallory.expect_next("*** mallory is now mal.")
    mallory.send("/nick bob")
    mallory.expect_next("You can change your name at most 1 time a minute.")
    join(b, "bob")  # welcomed: the name was free


@redis
def test_a_name_given_after_a_split_keeps_its_look_alikes_out(split_rooms, join, clients):
    """alice, renamed alice.2 at the relink, is safe from аӏісе.2 (all Cyrillic) on her server."""
    proxy, a, b, amy, bob = split_rooms
    alice_a = join(a, "alice", settle=False)
    join(b, "alice", settle=False)
    proxy.thaw()
    alice_a.expect("you are now alice.2", timeout=SPLIT_TIMEOUT)
    impostor = ChatClient(a.server_address)
    clients.append(impostor)
    impostor.send("\u0430\u04cf\u0456\u0441\u0435.2")
    impostor.expect("looks too much like alice.2")


@redis
@pytest.mark.parametrize("where", ["on the cut-off server", "on the others"])
def test_quiet_mode_set_during_a_split_is_one_for_the_room_after_the_relink(
        split_rooms, where):
    """The teacher's /quiet during a split: at the relink, the servers agree on it."""
    proxy, a, b, amy, bob = split_rooms
    TeacherConsole(a if where == "on the cut-off server" else b, None).handle_line("/quiet on")
    told = amy if where == "on the others" else bob  # the one who has not been told yet
    proxy.thaw()
    told.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    told.send("can I still talk")
    told.expect("Not sent: the room is quiet")


@redis
def test_quiet_mode_set_as_the_link_is_lost_is_one_for_the_room_after_the_relink(
        linked, join, proxies, quick_split):
    """/quiet typed while the link is already down but not yet declared split: it
    waited for Redis, and at the split was shown here only; the others follow it."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    amy = join(a, "amy")
    bob = join(b, "bob")
    proxy.freeze()
    TeacherConsole(a, None).handle_line("/quiet on")  # before the split is declared
    amy.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    proxy.thaw()
    bob.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    amy.send("still quiet here")
    amy.expect("Not sent: the room is quiet")


@redis
def test_quiet_mode_that_finds_the_queue_to_redis_full_is_one_for_the_room_after_the_relink(
        linked, join, quick_split):
    """/quiet typed as Redis falls behind: the full queue splits the room, the quiet is
    shown here only, and at the relink the others follow it (it was undone)."""
    a, b = linked(), linked()
    amy = join(a, "amy")
    bob = join(b, "bob")
    with a._lock:
        a._link.work_items = 0  # the queue to Redis is full: as when Redis falls behind
    TeacherConsole(a, None).handle_line("/quiet on")
    with a._lock:
        del a._link.work_items
    amy.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    bob.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    amy.send("still quiet here")
    amy.expect("Not sent: the room is quiet")
    assert chat_server.QUIET_OFF_LINE not in amy.seen


@redis
def test_a_name_cut_short_at_the_relink_never_becomes_a_reserved_one(split_rooms, join):
    """abcdefghij.teacherxy cut to make room for .2 would have teacher as a word."""
    name = "abcdefghij.teacherxy"
    proxy, a, b, amy, bob = split_rooms
    cut = join(a, name, settle=False)
    join(b, name, settle=False)
    proxy.thaw()
    cut.expect("took the name %s: you are now student.2" % name, timeout=SPLIT_TIMEOUT)


@redis
def test_a_look_alike_given_on_each_side_of_a_split_is_renamed_at_the_relink(
        split_rooms, join, clients):
    """alice joins on a while it is cut off, ᴀlice on b: at the relink, a's alice
    becomes alice.2, as with the same name."""
    proxy, a, b, amy, bob = split_rooms
    alice = join(a, "alice", settle=False)
    small_capital = join(b, "\u1d00lice", settle=False)
    proxy.thaw()
    alice.expect("took a name that looks like alice: you are now alice.2",
                 timeout=SPLIT_TIMEOUT)
    bob.expect("*** alice.2 joined the chat.", timeout=SPLIT_TIMEOUT)
    again = ChatClient(a.server_address)
    clients.append(again)
    again.send("alice")
    again.expect("looks too much like \u1d00lice")
    small_capital.close()
    alice.expect("*** \u1d00lice left the chat.")
    join(b, "alice")  # a let the name go when it renamed its alice


@redis
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_a_killed_server_s_students_leave_everywhere_once(linked, join, redis_server):
    a, c = linked(), linked()
    alice, amy = join(a, "alice"), join(a, "amy")
    carol, cleo = join(c, "carol"), join(c, "cleo")
    with server_process("--redis", redis_server.url(), launcher=FAST_LINK_LAUNCHER) as doomed:
        dave = doomed.join("dave")
        for student in (alice, carol):
            student.expect("*** dave joined the chat.")
        started = time.monotonic()
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(TIMEOUT)
        dave.close()
        for student in (alice, carol):
            student.expect("*** dave left the chat.", timeout=30)
        assert time.monotonic() - started < 30
        for student, other in ((alice, amy), (carol, cleo)):
            student.expect_nothing_before(other, "after dave")
            assert sum("dave left" in line for line in student.seen) == 1
    assert leaves_in_stream(redis_server, "dave") == 1  # announced by one server only


@redis
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="SIGSTOP is POSIX")
def test_a_server_that_stood_still_rejoins_its_students_and_renames_a_taken_name(
        linked, join, redis_server):
    """Ctrl+Z at a linked server's console: the others take it for dead and free
    its names. Back, it must not go on as if nothing happened: its students' lines
    would reach servers that no longer know them."""
    a = linked()
    carol = join(a, "carol")
    with server_process("--redis", redis_server.url(), launcher=FAST_LINK_LAUNCHER) as paused:
        alice = paused.join("alice")
        carol.expect("*** alice joined the chat.")
        paused.process.send_signal(signal.SIGSTOP)
        try:
            carol.expect("*** alice left the chat.", timeout=30)  # taken for dead
            impostor = join(a, "alice")
        finally:
            paused.process.send_signal(signal.SIGCONT)
        alice.expect("you are now alice.2", timeout=SPLIT_TIMEOUT)
        carol.expect("*** alice.2 joined the chat.", timeout=SPLIT_TIMEOUT)
        alice.send("back")
        carol.expect("alice.2 says: back")
        impostor.expect("alice.2 says: back")
        alice.close()


# Runs the script with the link's timings of FAST_LINK, so that a killed
# server's heartbeat expires in a second (Redis's shortest EX; still five of
# its heartbeats) rather than REDIS_HEARTBEAT_TTL_SECONDS.
FAST_LINK_LAUNCHER = (
    "import runpy, sys; sys.argv = sys.argv[1:]; script = runpy.run_path(sys.argv[0]); "
    "[setattr(script['RedisLink'], name, value) for name, value in %r.items()]; "
    "sys.exit(script['main']())" % dict(FAST_LINK, heartbeat_ttl_seconds=1)
)


def leaves_in_stream(redis_server, name):
    """How many leave events for name the room's stream holds."""
    connection = redis_server.connect()
    try:
        entries = connection.call("XRANGE", "class:events", "-", "+")
    finally:
        connection.close()
    events = [json.loads(fields[1]) for _, fields in entries]
    return sum(event["k"] == "leave" and event["name"] == name for event in events)


@redis
def test_an_event_read_twice_from_redis_is_shown_once(linked, join, redis_server):
    a = linked()
    alice = join(a, "alice")
    connection = redis_server.connect()
    try:
        for sequence, fields in ((1, {"k": "join", "name": "mallory"}),
                                 (2, {"k": "say", "name": "mallory", "texts": ["once"]}),
                                 (2, {"k": "say", "name": "mallory", "texts": ["once"]}),
                                 (3, {"k": "say", "name": "mallory", "texts": ["after"]})):
            connection.call("XADD", "class:events", "*", "e", event(n=sequence, **fields))
    finally:
        connection.close()
    alice.expect_next("*** mallory joined the chat.")
    alice.expect_next("mallory says: once")
    alice.expect_next("mallory says: after")


@redis
def test_a_local_message_is_shown_only_once_it_comes_back_through_redis(
        linked, join, proxies, monkeypatch):
    monkeypatch.setattr(chat_server.RedisLink, "silence_seconds", 30.0)  # no split by time
    proxy = proxies()
    a = linked(via=proxy)
    alice, amy = join(a, "alice"), join(a, "amy")
    alice.expect("amy joined")
    alice.send("ready")
    amy.expect("alice says: ready")  # all that came before is back from Redis
    proxy.freeze()
    alice.send("held in Redis's queue")
    amy.send("/who")
    amy.expect_next("*** Online now (2): alice, amy")  # alice's line has not come back yet
    proxy.thaw()  # the link is cut and comes back at once: sent again, shown once
    amy.expect_next("alice says: held in Redis's queue", timeout=SPLIT_TIMEOUT)
    alice.expect_nothing_before(amy)
    amy.send("/who")
    amy.expect_next("Online now")
    assert amy.seen.count("alice says: held in Redis's queue") == 1
    assert chat_server.SPLIT_LINE not in amy.seen


@redis
def test_a_server_started_in_quiet_mode_is_quiet_too(linked, join):
    a = linked()
    alice = join(a, "alice")
    a.set_quiet(True)
    alice.expect("Quiet, please")
    b = linked()
    bob = join(b, "bob")
    bob.send("hello?")
    bob.expect_next("*** Not sent: the room is quiet")


@redis
def test_a_killed_and_restarted_redis_splits_then_rejoins_the_room(
        join, redis_server, quick_split, two_rooms):
    a, b, alice, bob = two_rooms
    redis_server.stop()  # killed: every server's link drops
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    alice.send("alone in lab A")
    redis_server.restart()  # empty: names and stream are gone
    for student in (alice, bob):
        student.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    wait_until(lambda: "bob" in a.who() and "alice" in b.who(), timeout=SPLIT_TIMEOUT,
               message="each server lists the other's student again")
    bob.send("back together")
    alice.expect("bob says: back together")
    assert "alone in lab A" not in " ".join(bob.seen)


@redis
def test_a_line_redis_took_then_forgot_in_a_restart_is_sent_again_in_its_place(
        linked, join, redis_server):
    """Redis answered its XADD, then restarted empty before the stream gave it
    back: it is sent again, ahead of the sender's next line, to every server."""
    a, b = linked(), linked()
    alice, amy = join(a, "alice"), join(a, "amy")
    bob = join(b, "bob")
    amy.expect("*** bob joined the chat.")
    gates = [gate_the_reader(server) for server in (a, b)]
    try:
        for parked, _ in gates:
            assert parked.wait(TIMEOUT), "a reader did not park"
        alice.send("one")
        wait_until(lambda: len(a._link._pending) == 1 and not a._link._outbox
                   and not a._link._in_flight, message="one answered by Redis, not read back")
        redis_server.restart()  # empty: the stream is gone, with "one" in it
    finally:
        for _, release in gates:
            release.set()
    wait_until(lambda: a._link._redis is not None and a._link._run_id is not None
               and not a._link._restart_unsettled, timeout=SPLIT_TIMEOUT,
               message="the writer back on the new Redis")
    alice.send("two")
    for student in (amy, bob):
        student.expect_next("alice says: one", timeout=SPLIT_TIMEOUT)
        student.expect_next("alice says: two")


@pytest.fixture
def three_rooms_one_held(linked, join, proxies, quick_split, redis_server):
    """(proxy, alice, bob, carol): alice on a, bob on b, carol on c, linked
    through one Redis; c's link goes through proxy, which refuses for now.
    Redis has been restarted empty, and a and b have relinked."""
    proxy = proxies()
    a, b, c = linked(), linked(), linked(via=proxy)
    alice, bob, carol = join(a, "alice"), join(b, "bob"), join(c, "carol")
    for student in (alice, bob):
        student.expect("*** carol joined the chat.")
    proxy.refusing = True  # c's reconnections are refused; then its link is cut
    redis_server.stop()
    for student in (alice, bob, carol):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    redis_server.restart()  # empty: every name, and the stream, are gone
    for student in (alice, bob):
        student.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    return proxy, alice, bob, carol


@redis
def test_a_redis_restarted_empty_shows_nobody_leaving_or_joining(three_rooms_one_held):
    """The servers relink one after another: each finds in Redis only the
    students of those back before it, and must not take the others for gone."""
    proxy, alice, bob, carol = three_rooms_one_held
    before = len(alice.seen), len(bob.seen)
    proxy.refusing = False
    carol.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    carol.send("back with you")
    for student, start in zip((alice, bob), before):
        student.expect("carol says: back with you", timeout=SPLIT_TIMEOUT)
        assert not [line for line in student.seen[start:]
                    if " left the chat." in line or " joined the chat." in line]


@redis
def test_a_server_that_never_comes_back_after_redis_restarted_empty_has_its_students_leave(
        three_rooms_one_held):
    """Redis forgot carol's name, so no one can free it: the first server to
    note c gone announces her leave, once, for everyone."""
    proxy, alice, bob, carol = three_rooms_one_held
    for student in (alice, bob):
        student.expect("*** carol left the chat.", timeout=SPLIT_TIMEOUT)
    wait_until(lambda: alice.seen.count("*** carol left the chat.") == 1 and
               bob.seen.count("*** carol left the chat.") == 1, message="one leave each")
    alice.send("and now?")
    bob.expect("alice says: and now?")
    assert bob.seen.count("*** carol left the chat.") == 1


@pytest.fixture
def restart_with_a_back_first(linked, join, proxies, quick_split, redis_server):
    """(proxy, a, b, alice, bob): a linked through proxy, b directly; Redis is
    stopped, and, while the proxy refuses a, restarted empty; b is back."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    proxy.refusing = True
    redis_server.stop()
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)

    def restart():
        redis_server.restart()  # empty
        bob.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)

    return proxy, a, b, alice, bob, restart


@redis
def test_a_student_who_left_a_server_back_first_after_redis_restarted_leaves_the_others(
        restart_with_a_back_first, join):
    """a reads the new stream from its end, after b's leave of dave: it must not
    keep dave, who left, as one of a server not back yet."""
    proxy, a, b, alice, bob, restart = restart_with_a_back_first
    dave = joined_on(b, "dave")  # during the split: a does not know dave yet
    restart()
    alice.send("/who")  # (a is still apart)
    dave.close()
    bob.expect("*** dave left the chat.", timeout=SPLIT_TIMEOUT)
    proxy.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect_next("*** Online now (2): alice, bob")


@redis
def test_a_student_known_before_who_left_after_redis_restarted_is_told_gone(
        linked, join, proxies, quick_split, redis_server):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice, bob, dave = join(a, "alice"), join(b, "bob"), join(b, "dave")
    alice.expect("*** dave joined the chat.")
    proxy.refusing = True
    redis_server.stop()
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    redis_server.restart()  # empty
    bob.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)  # b is back, a is not
    dave.close()
    bob.expect("*** dave left the chat.", timeout=SPLIT_TIMEOUT)
    proxy.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect_next("*** dave left the chat.")
    alice.expect_next("*** Online now (2): alice, bob")


@redis
def test_a_namesake_leaving_another_server_during_a_redis_restart_is_not_taken_for_ours(
        linked, join, proxies, quick_split, redis_server):
    """Apart, c gave the name bob to a student of its own, who left. c, back first
    after Redis restarted, tells that leave: a, back next, must not take it for
    the leave of b's bob, whom it keeps until b is back."""
    to_a, to_b, to_c = proxies(), proxies(), proxies()
    a, b, c = linked(via=to_a), linked(via=to_b), linked(via=to_c)
    alice, bob = join(a, "alice"), join(b, "bob")
    for proxy in (to_a, to_b, to_c):
        proxy.refusing = True
    redis_server.stop()
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    wait_until(lambda: not c._link.linked, message="c split")
    namesake = joined_on(c, "bob")
    namesake.close()
    wait_until(lambda: c.find("bob") is None, message="c's bob gone")
    redis_server.restart()  # empty
    to_c.refusing = False
    wait_until(lambda: c._link.linked and not c._link._outbox and not c._link._in_flight,
               timeout=SPLIT_TIMEOUT, message="c back, its leave of bob sent")
    to_a.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect_next("*** Online now (2): alice, bob")


@redis
def test_quiet_lifted_during_a_redis_restart_stays_lifted_when_the_others_relink(
        linked, join, proxies, quick_split, redis_server):
    """Quiet mode was on; b's teacher lifted it while Redis was down, and b came
    back first: a, which did nothing, must follow b, not put quiet mode back on."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    TeacherConsole(a, None).handle_line("/quiet on")
    bob.expect(chat_server.QUIET_ON_LINE)
    proxy.refusing = True
    redis_server.stop()
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    TeacherConsole(b, None).handle_line("/quiet off")
    bob.expect(chat_server.QUIET_OFF_LINE)
    redis_server.restart()  # empty
    bob.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)  # b is back, a is not
    proxy.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect(chat_server.QUIET_OFF_LINE)
    alice.send("may we talk again?")
    bob.expect("alice says: may we talk again?", timeout=SPLIT_TIMEOUT)


@redis
def test_quiet_lifted_during_a_redis_restart_by_a_server_with_no_students_stays_lifted(
        linked, join, proxies, quick_split, redis_server):
    """b, back first, writes nothing else to the new stream: a must still hear
    that b's teacher lifted quiet mode, and not put it back on."""
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    alice = join(a, "alice")
    TeacherConsole(a, None).handle_line("/quiet on")
    alice.expect(chat_server.QUIET_ON_LINE)
    proxy.refusing = True
    redis_server.stop()
    alice.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    wait_until(lambda: not b._link.linked, message="b split")
    TeacherConsole(b, None).handle_line("/quiet off")
    redis_server.restart()  # empty
    wait_until(lambda: b._link.linked, timeout=SPLIT_TIMEOUT, message="b back")
    proxy.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    alice.expect(chat_server.QUIET_OFF_LINE)


@redis
def test_a_server_started_as_redis_comes_back_does_not_lift_quiet_mode(
        linked, join, proxies, quick_split, redis_server):
    """c finds no server in the restarted Redis and begins a new lesson; a, back
    after it, keeps the room quiet: nobody lifted quiet mode."""
    proxy = proxies()
    a = linked(via=proxy)
    alice = join(a, "alice")
    TeacherConsole(a, None).handle_line("/quiet on")
    alice.expect(chat_server.QUIET_ON_LINE)
    proxy.refusing = True
    redis_server.stop()
    alice.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    redis_server.restart()  # empty
    carol = join(linked(), "carol", settle=False)  # (a is still apart)
    proxy.refusing = False
    alice.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    carol.expect(chat_server.QUIET_ON_LINE, timeout=SPLIT_TIMEOUT)
    carol.send("is it quiet?")
    carol.expect_next("*** Not sent: the room is quiet")


@redis
def test_a_whisper_heard_before_its_server_relinked_is_still_answered(
        split_rooms, monkeypatch, caplog):
    """a's listener is back and hears bob's whisper to amy, who took another name
    during the split; a's writer has not relinked yet: the answer that amy is
    not there waits for it, and bob is told."""
    proxy, a, b, amy, bob = split_rooms
    amy.send("/nick amelia")
    amy.expect("*** amy is now amelia.")
    may_relink, real_relink = threading.Event(), chat_server.RedisLink._relink

    def held_back(link, *args):
        may_relink.wait(SPLIT_TIMEOUT)
        return real_relink(link, *args)

    monkeypatch.setattr(chat_server.RedisLink, "_relink", held_back)
    proxy.thaw()
    bob.send("/msg amy are you there?")
    expect_console(caplog, "A whisper for amy, who is not here")
    may_relink.set()
    bob.expect("*** Your whisper to amy did not arrive", timeout=SPLIT_TIMEOUT)


@redis
def test_a_whisper_to_a_student_cut_off_by_a_split_says_they_are_out_of_reach(split_rooms):
    proxy, a, b, amy, bob = split_rooms
    amy.send("/msg bob are you there")
    amy.expect_next("*** bob is on another server, out of reach for now: try again once "
                    "the room is whole.")
    amy.send("/msg nobody hello")
    amy.expect_next("*** No one called nobody is online.")


@redis
def test_a_kick_of_a_student_cut_off_by_a_split_says_they_are_out_of_reach(
        split_rooms, caplog):
    proxy, a, b, amy, bob = split_rooms
    TeacherConsole(a, None).handle_line("/kick bob")
    expect_console(caplog, "bob is on another server, out of reach for now")


@redis
def test_the_linked_consoles_help_ban_and_unban_say_bans_are_per_server(linked, caplog):
    a = linked()
    console = TeacherConsole(a, None)
    console.handle_line("/help")
    expect_console(caplog, "bans, /unban and /shutdown are for this server only.")
    console.handle_line("/ban 127.0.0.9")
    expect_console(caplog, "(On this server only: each linked server bans at its own console.)")
    console.handle_line("/unban ada")
    expect_console(caplog, "(Bans are per server: a student kicked from another server is "
                           "let back in at its console.)")


@redis
def test_a_whisper_lost_to_a_split_is_owned_up_to(linked, join, proxies, quick_split):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    amy = join(a, "amy")
    join(b, "bob")
    proxy.freeze()  # the link stalls; the split is declared a moment later
    amy.send("/msg bob see you at noon")
    amy.expect("*** You whispered to bob: see you at noon")
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    amy.expect("*** Your whisper to bob may not have arrived", timeout=SPLIT_TIMEOUT)


@redis
def test_a_mute_typed_during_a_split_follows_the_student_after_the_relink(
        split_rooms, join):
    proxy, a, b, amy, bob = split_rooms
    TeacherConsole(a, None).handle_line("/mute amy")
    amy.expect("The teacher has muted you")
    proxy.thaw()
    amy.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    wait_until(lambda: "amy" in b.who(), timeout=SPLIT_TIMEOUT, message="b to list amy")
    amy.close()
    bob.expect("*** amy left the chat.")
    amy = join(b, "amy")  # on the other server now
    amy.send("still here")
    amy.expect("*** Not sent: the teacher has muted you.")


@redis
def test_a_student_who_joins_during_a_split_is_told_the_room_is_split(split_rooms, join):
    proxy, a, b, amy, bob = split_rooms
    ann = join(a, "ann", settle=False)
    assert ann.seen[-1] == "*** Online now (2): amy, ann"  # only this server's
    ann.expect_next(chat_server.SPLIT_LINE)


@redis
def test_a_kick_asked_of_another_server_is_answered_on_the_asking_console(
        two_rooms, join, caplog):
    a, b, alice, bob = two_rooms
    join(b, "carol")  # from bob's address too: no ban, and the answer says why
    TeacherConsole(a, None).handle_line("/kick bob")
    bob.expect_closed()
    expect_console(caplog, "The server of bob answers: Kicked bob; 127.0.0.1 is not banned: "
                           "carol joined from it too. /ban 127.0.0.1 at the console of "
                           "bob's server")  # there: alice is on this one


@redis
def test_the_answer_to_a_kick_elsewhere_says_where_to_unban(two_rooms, caplog):
    """Bans are per server: /unban typed on the asking console would find none."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/kick bob")
    bob.expect_closed()
    expect_console(caplog, "The server of bob answers: Kicked bob; 127.0.0.1 may not rejoin "
                           "for 5 minutes (/unban bob at the console of bob's server lifts it).")


@redis
def test_the_kicked_students_own_console_shows_the_answer_as_sent_to_the_other_teacher(
        two_rooms, caplog):
    """"/unban bob at the console of bob's server" is that very console: it is
    shown there as the answer that went to the asking teacher."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/kick bob")
    bob.expect_closed()
    expect_console(caplog, "Answered that teacher: Kicked bob; 127.0.0.1 may not rejoin")


@redis
def test_a_mute_put_back_after_a_split_sends_the_state_wanted_now(linked):
    """Work put back after a split may go out in another order: a mute then an
    unmute must still leave the name unmuted in Redis."""
    link = linked()._link
    link.note_muted("amy", True)
    link.note_muted("amy", False)
    assert link._commands_for(("mute", "amy")) == [("SREM", "class:muted", "amy"),
                                                  ("SADD", "class:unmuted", "amy")]


@redis
def test_a_restarted_empty_redis_does_not_lift_quiet_mode(
        join, redis_server, quick_split, two_rooms):
    """Redis forgot the room's quiet mode with everything else: no teacher lifted it."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/quiet on")
    for student in (alice, bob):
        student.expect(chat_server.QUIET_ON_LINE)
    redis_server.stop()
    for student in (alice, bob):
        student.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    redis_server.restart()  # empty
    for student in (alice, bob):
        student.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    wait_until(lambda: "bob" in a.who() and "alice" in b.who(), timeout=SPLIT_TIMEOUT,
               message="each server lists the other's student again")
    for student in (alice, bob):
        student.send("can I talk now")
        student.expect("Not sent: the room is quiet")
        assert student.seen.count(chat_server.QUIET_ON_LINE) == 1  # not again at the relink
    assert not [line for line in alice.seen + bob.seen if chat_server.QUIET_OFF_LINE in line]


def redis_holds(redis_server, command, *args):
    """The reply to one command, from a connection of the test's own."""
    connection = redis_server.connect()
    try:
        return connection.call(command, *args)
    finally:
        connection.close()


@redis
def test_a_redis_restarted_in_a_moment_still_holds_the_quiet_mode_for_a_new_server(
        two_rooms, join, linked, redis_server):
    """Too short a drop for a split: the servers still hold quiet mode, and
    they put it back in the empty Redis for a server that starts after."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/quiet on")
    bob.expect(chat_server.QUIET_ON_LINE)
    redis_server.restart()  # empty
    wait_until(lambda: redis_holds(redis_server, "EXISTS", "class:quiet") == 1,
               timeout=SPLIT_TIMEOUT, message="quiet mode back in Redis")
    carol = join(linked(), "carol")
    carol.send("is it quiet?")
    carol.expect("*** Not sent: the room is quiet")  # (after joins told again, maybe)


@redis
def test_a_redis_restarted_in_a_moment_still_holds_a_mute_for_another_server(
        two_rooms, join, linked, redis_server):
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/mute bob")  # bob is on b: b holds the mute
    bob.expect("The teacher has muted you")
    redis_server.restart()  # empty
    wait_until(lambda: redis_holds(redis_server, "SISMEMBER", "class:muted", "bob") == 1,
               timeout=SPLIT_TIMEOUT, message="the mute back in Redis")
    bob.close()
    alice.expect("*** bob left the chat.")
    bob = join(linked(), "bob")  # a third server, started after the restart
    bob.send("muted no more?")
    bob.expect("*** Not sent: the teacher has muted you.")  # after alice's join, maybe:
    # the names come back into Redis at the servers' next heartbeat


@redis
def test_a_muted_student_who_reconnects_to_another_server_is_muted_there(two_rooms, join):
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/mute bob")  # bob is on b
    bob.expect("The teacher has muted you")
    bob.close()
    alice.expect("*** bob left the chat.")
    bob = join(a, "bob")  # the teacher's own server this time
    bob.send("you cannot stop me")
    bob.expect("*** Not sent: the teacher has muted you.")
    TeacherConsole(b, None).handle_line("/unmute bob")  # from the other console
    bob.expect("The teacher has unmuted you")
    bob.close()
    alice.expect("*** bob left the chat.")
    wait_until(lambda: "bob" not in b.who(), message="b to hear bob left")  # a moment behind
    bob = join(b, "bob")
    bob.send("thank you")
    alice.expect("bob says: thank you")


@redis
def test_an_unmute_where_the_student_is_now_lifts_the_mute_another_server_holds(
        two_rooms, join):
    """b muted bob's computer at a's /mute; bob moved to a, and was unmuted there."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/mute bob")  # bob is on b
    bob.expect("The teacher has muted you")
    bob.close()
    alice.expect("*** bob left the chat.")
    bob = join(a, "bob")
    TeacherConsole(a, None).handle_line("/unmute bob")  # at his server now
    bob.expect("The teacher has unmuted you")
    wait_until(lambda: not b.addresses.is_muted("127.0.0.1", "bob"),
               message="b to forget the mute it held")
    bob.close()
    alice.expect("*** bob left the chat.")
    wait_until(lambda: "bob" not in b.who(), message="b to hear bob left")
    bob = join(b, "bob")
    bob.send("back where I was")
    alice.expect("bob says: back where I was")


@redis
def test_an_unmute_typed_during_a_split_reaches_the_other_servers_at_the_relink(
        linked, join, proxies, quick_split):
    proxy = proxies()
    a, b = linked(via=proxy), linked()
    sam = join(b, "sam")
    TeacherConsole(a, None).handle_line("/mute sam")  # b holds the mute
    sam.expect("The teacher has muted you")
    proxy.freeze()
    wait_until(lambda: not a._link.linked, timeout=SPLIT_TIMEOUT, message="a split")
    TeacherConsole(a, None).handle_line("/unmute sam")  # a is on its own
    proxy.thaw()
    sam.expect("The teacher has unmuted you", timeout=SPLIT_TIMEOUT)


@pytest.fixture
def muted_and_cut_off(linked, join, proxies, quick_split):
    """(proxy, a, b, sam): a's teacher muted sam, of b (b holds the mute, and
    Redis too); then b was cut off, and sam told so."""
    proxy = proxies()
    a, b = linked(), linked(via=proxy)
    sam = join(b, "sam")
    TeacherConsole(a, None).handle_line("/mute sam")
    sam.expect("The teacher has muted you")
    wait_until(lambda: "sam" in b._link._mutes_stored, message="b to store the mute")
    proxy.freeze()
    sam.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    return proxy, a, b, sam


@redis
def test_an_unmute_typed_while_the_students_server_is_cut_off_reaches_it_at_the_relink(
        muted_and_cut_off):
    """The unmute goes out by pub/sub, which keeps nothing for a server cut off:
    at the relink, that server finds it unmuted in Redis, and lifts its own."""
    proxy, a, b, sam = muted_and_cut_off
    TeacherConsole(a, None).handle_line("/unmute sam")  # b hears nothing of it
    proxy.thaw()
    sam.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    sam.expect("The teacher has unmuted you", timeout=SPLIT_TIMEOUT)


@redis
def test_a_mute_gone_from_redis_with_no_unmute_stays_at_the_relink(muted_and_cut_off):
    """Redis's muted names can go without anyone typing /unmute (a server that
    started a new lesson meanwhile cleared them): the mute held here stays."""
    proxy, a, b, sam = muted_and_cut_off
    redis = chat_server.RedisConnection(a._link.url)
    try:
        redis.call("DEL", a._link._muted_key)
    finally:
        redis.close()
    proxy.thaw()
    sam.expect(chat_server.WHOLE_LINE, timeout=SPLIT_TIMEOUT)
    sam.send("still muted?")
    sam.expect("*** Not sent: the teacher has muted you.")


@redis
def test_an_unmute_asked_of_a_server_the_student_just_left_still_lifts_its_mute(
        two_rooms, join):
    """a still lists bob on b (b's news of his leave is held back): a asks b, where
    he is no more; b must forget the mute it holds all the same."""
    a, b, alice, bob = two_rooms
    TeacherConsole(a, None).handle_line("/mute bob")
    bob.expect("The teacher has muted you")
    let_through = hold_back_stream(a, lambda event: event["k"] == "leave")
    try:
        bob.close()
        wait_until(lambda: b.find("bob") is None, message="bob gone from b")
        TeacherConsole(a, None).handle_line("/unmute bob")
        wait_until(lambda: not b.addresses.is_muted("127.0.0.1", "bob"),
                   message="b to forget the mute it held")
    finally:
        let_through.set()


@redis
def test_the_console_of_one_server_kicks_a_student_on_another(linked, join, redis_server):
    b = linked()
    bob = join(b, "bob")
    with server_process("--redis", redis_server.url(), stdin=subprocess.PIPE) as console:
        alice = console.join("alice")
        try:
            assert alice.seen[-1] == "*** Online now (2): alice, bob"
            console.type("/kick bob disrupting the class")
            bob.expect("removed you from the chat: disrupting the class")
            alice.expect("*** bob left the chat.")
            console.type("/who")
            console.expect_log("1 online")
        finally:
            alice.close()


@redis
def test_a_server_that_shuts_down_shows_its_students_leaving_elsewhere(linked, join):
    a, b = linked(), linked()
    alice = join(a, "alice")
    join(b, "bob")
    alice.expect("bob joined")
    b.close_room()
    alice.expect_next("*** bob left the chat.")
    assert "bob" not in a.who()


@pytest.fixture
def stopping_unheard(linked, join, proxies):
    """(a, amy, ann): a linked through a proxy that is then frozen (Redis hears
    nothing more, and no split is declared yet), amy and ann on a."""
    proxy = proxies()
    a = linked(via=proxy)
    amy = join(a, "amy")
    # Else ann, in before amy's join is back from Redis, is shown it after.
    wait_until(lambda: not a._link._pending, message="amy's join back from Redis")
    ann = join(a, "ann")
    amy.expect("*** ann joined the chat.")  # (so ann's join is back too)
    proxy.freeze()
    return a, amy, ann


@redis
def test_a_line_still_on_its_way_through_redis_at_shutdown_is_shown_before_the_goodbye(
        stopping_unheard):
    a, amy, ann = stopping_unheard
    amy.send("last words")
    wait_until(lambda: a._link._pending, message="amy's line on its way through Redis")
    a.close_room()
    ann.expect_next("amy says: last words")
    ann.expect_next("*** " + chat_server.SHUTTING_DOWN)


@redis
def test_a_stopped_server_says_nothing_of_redis_going_away_after_it(
        two_rooms, redis_server, caplog):
    """The teacher stops the server, then Redis: the link's threads end quietly
    (a line logged then could land in the next test's log, or on a console)."""
    a, b, alice, bob = two_rooms
    for server in (a, b):
        server.close_room()
    redis_server.stop()
    for thread in a._link._threads + b._link._threads:
        thread.join(SPLIT_TIMEOUT)
    assert not [line for line in console_lines(caplog) if "Redis channel lost" in line]


@redis
def test_a_server_saying_goodbye_never_links_again(two_rooms, join, monkeypatch):
    """A big room takes a while to be told goodbye: the link must not take its
    unlinking for a split meanwhile, relink, and bring its students back."""
    a, b, alice, bob = two_rooms
    relinked, real_relink = [], chat_server.RedisLink._relink
    monkeypatch.setattr(chat_server.RedisLink, "_relink",
                        lambda link, *args: relinked.append(link) or real_relink(link, *args))
    real_close_when_sent = chat_server.Client.close_when_sent

    def slowly(client):  # stands for the goodbyes of a few thousand students
        deadline = time.monotonic() + 1.0  # (fast_link: retries every 0.1 s)
        while not relinked and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_close_when_sent(client)

    monkeypatch.setattr(chat_server.Client, "close_when_sent", slowly)
    a.close_room()
    assert not relinked
    bob.expect("*** alice left the chat.")
    wait_until(lambda: "alice" not in b.who(), message="alice gone from b's list")


@redis
def test_a_newcomer_while_the_server_says_goodbye_to_redis_is_not_told_of_a_split(
        stopping_unheard):
    a, amy, ann = stopping_unheard
    closing = threading.Thread(target=a.close_room)  # waits on the frozen Redis a while
    closing.start()
    newcomer = ChatClient(a.server_address)
    try:
        wait_until(lambda: not a._link.linked, message="the link let go")
        newcomer.send("nina")
        newcomer.expect(chat_server.SHUTTING_DOWN)
        assert chat_server.SPLIT_LINE not in newcomer.seen
    finally:
        newcomer.close()
        closing.join(TIMEOUT)


@redis
def test_the_first_server_of_a_new_lesson_lets_the_last_lessons_chat_and_quiet_go(
        linked, join):
    """Redis keeps the room for days: one period's chat is not the next class's."""
    monday = linked()
    alice, amy = join(monday, "alice"), join(monday, "amy")
    alice.send("monday's answers")
    amy.expect("alice says: monday's answers")  # back through Redis: in its stream
    chat_server.TeacherConsole(monday, None).handle_line("/quiet on")
    amy.expect("*** [teacher]")
    monday.close_room()
    tuesday = linked()  # no other server is linked now
    bob = join(tuesday, "bob", settle=False)  # (monday, stopped, would never list him)
    assert not [line for line in bob.seen if "monday" in line or "quiet" in line], bob.seen
    # His join is shown when it comes back through Redis: had carol joined
    # before that, she would be shown it too (he is in her list of who is on).
    wait_until(lambda: not tuesday._link._pending, message="bob's join back from Redis")
    carol = join(tuesday, "carol", settle=False)
    bob.send("tuesday")
    carol.expect_next("bob says: tuesday")  # not held back: the room is not quiet


@redis
def test_a_live_server_whose_heartbeat_redis_lost_for_a_moment_is_not_taken_for_dead(
        two_rooms, redis_server):
    """After a Redis restart every key is gone, and a live server may be a few
    seconds from its next heartbeat: its students must not be shown leaving."""
    a, b, alice, bob = two_rooms
    connection = redis_server.connect()
    try:
        key = "class:server:" + b._link.server_id
        deadline = time.monotonic() + 0.8 * FAST_LINK["heartbeat_ttl_seconds"]
        while time.monotonic() < deadline:  # missing far longer than it beats
            connection.call("DEL", key)
            time.sleep(FAST_LINK["heartbeat_seconds"] / 4)  # the fault under test
    finally:
        connection.close()
    bob.send("still here")
    alice.expect_next("bob says: still here")  # not "bob left the chat."


@redis
def test_a_server_cut_off_from_redis_is_not_taken_for_a_finished_lesson(
        linked, join, proxies, quick_split, redis_server):
    """Its heartbeat lapses while it is apart; a server started meanwhile (a second
    lab joining) must not trim the room's history as if the lesson were over."""
    proxy = proxies()
    a = linked(via=proxy)
    amy, ann = join(a, "amy"), join(a, "ann")
    amy.send("before the cut")
    ann.expect("amy says: before the cut")
    proxy.freeze()
    amy.expect(chat_server.SPLIT_LINE, timeout=SPLIT_TIMEOUT)
    connection = redis_server.connect()
    try:
        wait_until(lambda: not connection.call("EXISTS", "class:server:" + a._link.server_id),
                   timeout=SPLIT_TIMEOUT, message="a's heartbeat to lapse")
    finally:
        connection.close()
    dave = join(linked(), "dave", settle=False)
    assert "amy says: before the cut" in dave.seen


@redis
def test_a_rejoin_after_a_split_is_not_a_second_join_in_a_newcomers_history(
        linked, join, redis_server):
    join(linked(), "alice")  # a server is linked: the next one starts no new lesson
    connection = redis_server.connect()
    try:
        for sequence, again in ((1, False), (2, True)):
            connection.call("XADD", "class:events", "*", "e",
                            event(k="join", name="mallory", n=sequence, again=again))
    finally:
        connection.close()
    newcomer = join(linked(), "bob", settle=False)
    assert sum("mallory joined" in line for line in newcomer.seen) == 1, newcomer.seen


@redis
def test_a_rejoin_after_a_servers_students_were_let_go_is_shown_in_the_history(
        linked, join, redis_server):
    """Reaped, then back: the history must not end with "left" for someone online."""
    join(linked(), "alice")
    connection = redis_server.connect()
    try:
        for sequence, fields in ((1, {"k": "join"}), (2, {"k": "leave", "of": "0" * 16}),
                                 (3, {"k": "join", "again": True})):
            connection.call("XADD", "class:events", "*", "e",
                            event(name="mallory", n=sequence, **fields))
    finally:
        connection.close()
    newcomer = join(linked(), "bob", settle=False)
    mallory = [line for line in newcomer.seen if "mallory" in line]
    assert mallory[-1] == "*** mallory joined the chat.", newcomer.seen


def test_a_redis_elsewhere_without_a_password_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, SERVER_SCRIPT, "--redis", "redis://192.0.2.7/lab"],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT * 2)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "give its password" in lines[0], lines


@redis
def test_a_bad_name_key_in_redis_is_logged_and_ignored(linked, redis_server, join, caplog):
    connection = redis_server.connect()
    try:
        connection.call("SET", "class:name:eve", b"\xff not json")
        connection.call("SET", "class:name:bob", json.dumps({"name": "b o b", "server": "ab" * 8}))
    finally:
        connection.close()
    a = linked()
    alice = join(a, "alice")
    assert alice.seen[-1] == "*** Online now (1): alice"
    expect_console(caplog, "A bad name key")


@pytest.mark.parametrize("reply", [
    b"*1\r\n*2\r\n$5\r\nclass\r\n*1\r\n*2\r\n$5\r\nnotid\r\n*0\r\n",
    b"*1\r\n*2\r\n$5\r\nclass\r\n:5\r\n",
    b"*2\r\n:1\r\n:2\r\n",
], ids=["bad id", "entries not a list", "wrong shape"])
def test_a_misshapen_xread_reply_is_a_protocol_error(reply):
    parser = RespParser()
    parser.feed(reply)
    with pytest.raises(RedisProtocolError):
        chat_server.xread_entries(parser.next_reply())


@redis
def test_a_rename_that_only_changes_case_keeps_the_name_claimed(linked, two_rooms):
    a, b, alice, bob = two_rooms
    alice.send("/nick Alice")
    bob.expect_next("*** alice is now Alice.")
    late = linked()  # knows only what Redis holds
    newcomer = ChatClient(late.server_address)
    try:
        newcomer.send("ALICE")
        newcomer.expect("The name Alice is taken.")
    finally:
        newcomer.close()


# --- Races with another server ------------------------------------------------
# Each test makes the other server's move at the worst moment, and shows that
# nothing is lost for it.

OTHER_SERVER = "ab" * 8  # a server id that is not ours


def name_key(name):
    return "class:name:" + name


@redis
def test_a_stale_claim_never_frees_a_name_another_server_claimed_meanwhile(
        linked, redis_server, monkeypatch):
    """Our claim of a name was never used; as we free it, another server takes it: it stays theirs."""
    monkeypatch.setattr(chat_server, "REDIS_CLAIM_GRACE_SECONDS", 0.0)
    link = linked()._link
    ours = redis_server.connect()
    theirs = json.dumps({"name": "zed", "server": OTHER_SERVER})
    raced = []
    real_call = chat_server.RedisConnection.call

    def call_with_a_race(connection, *args, **options):
        reply = real_call(connection, *args, **options)
        if not raced and name_key("zed") in args:
            # Right after the link's first command of the release, another
            # server takes the name (as if ours had expired just before).
            raced.append(real_call(ours, "SET", name_key("zed"), theirs))
        return reply

    try:
        assert link.claim_name("zed", "zed") is None  # claimed, never joined: stale at once
        monkeypatch.setattr(chat_server.RedisConnection, "call", call_with_a_race)
        wait_until(lambda: "zed" not in link._claimed, message="the stale claim released")
        assert raced, "the release never touched the name's key"
        assert ours.call("GET", name_key("zed")) == theirs.encode()
    finally:
        ours.close()


@redis
def test_a_whisper_sent_while_the_other_server_resubscribes_still_arrives(
        linked, join, monkeypatch, caplog):
    """A PUBLISH that no server heard (its listener was reconnecting) is sent again."""
    a, b = linked(), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    listening = hold_back_listener(b, monkeypatch, caplog)  # b's channel is lost
    alice.send("/msg bob are you there?")
    alice.expect("*** You whispered to bob: are you there?")
    alice.send("sentinel")  # its XADD follows the PUBLISH on a's one connection
    bob.expect("alice says: sentinel")  # so the PUBLISH was done, and no one heard it
    listening.set()
    bob.expect("alice whispers: are you there?")


@redis
def test_a_whisper_sent_while_the_other_server_stalls_arrives_when_it_is_back(
        split_rooms):
    """Redis took the PUBLISH into that server's channel: kept, not reconnected, the
    channel brings it once the stall ends."""
    proxy, a, b, amy, bob = split_rooms  # a's link is frozen, a split already
    bob.send("/msg amy are you there?")
    bob.expect("*** You whispered to amy: are you there?")
    channel = a._link._listener
    silence = 3 * chat_server.RedisLink.silence_seconds  # long past a split's silence
    wait_until(lambda: time.monotonic() - channel.last_heard > silence,
               message="a long stall of the channel")
    proxy.resume()  # the same connections: what Redis sent into them comes through
    amy.expect("bob whispers: are you there?", timeout=SPLIT_TIMEOUT)


@redis
def test_a_private_message_sent_twice_is_acted_on_once(two_rooms):
    """A server's writer that reconnects sends again what was in flight: a PUBLISH
    that Redis had done already reaches the other server a second time."""
    a, b, alice, bob = two_rooms
    with a._lock:  # numbered as a's link numbers what it sends
        event = a._link._stamp({"k": "whisper", "name": "alice", "to": "bob", "text": "once"})
    redis = chat_server.RedisConnection(a._link.url)
    try:
        for _ in range(2):
            redis.call("PUBLISH", b._link.channel, json.dumps(event))
    finally:
        redis.close()
    bob.expect_next("alice whispers: once")
    alice.send("and then")
    bob.expect_next("alice says: and then")


@redis
def test_marks_whose_whispers_do_not_come_hold_the_stream_back_once_not_each(
        two_rooms, monkeypatch, caplog):
    """b's listener is away: each whisper's mark would make b wait its full time."""
    a, b, alice, bob = two_rooms
    listening = hold_back_listener(b, monkeypatch, caplog)
    waits, real_wait_for = [], b._link._private_came.wait_for
    monkeypatch.setattr(b._link._private_came, "wait_for",
                        lambda *args: waits.append(args) or real_wait_for(*args))
    for number in range(5):
        alice.send("/msg bob number %d" % number)
        alice.expect("*** You whispered to bob: number %d" % number)
    alice.send("a line for all")
    bob.expect("alice says: a line for all")
    assert len(waits) == 1
    listening.set()


def hold_back_listener(server, monkeypatch, caplog):
    """Cut server's channel and keep its listener from subscribing; return the Event that lets it."""
    listening = threading.Event()
    subscribe = server._link._subscribe

    def subscribe_when_allowed():
        if not listening.is_set():
            raise ConnectionError("the test holds the listener back")
        return subscribe()

    monkeypatch.setattr(server._link, "_subscribe", subscribe_when_allowed)
    server._link._listener.sock.shutdown(socket.SHUT_RDWR)
    wait_until(lambda: "Redis channel lost" in caplog.text, message="listener gone")
    return listening


def hold_back_resends(server, monkeypatch):
    """The next heartbeats of server do not send unheard messages again until the Event is set."""
    allowed = threading.Event()
    real = server._link._send_unheard_again
    monkeypatch.setattr(server._link, "_send_unheard_again",
                        lambda: real() if allowed.is_set() else None)
    return allowed


def subscribed(redis_server, server):
    channel = server._link.url.room + ":to:" + server._link.server_id
    connection = redis_server.connect()
    try:
        return connection.call("PUBSUB", "NUMSUB", channel)[1] > 0
    finally:
        connection.close()


@redis
def test_two_whispers_sent_across_a_resubscribe_arrive_in_the_order_sent(
        linked, join, redis_server, monkeypatch, caplog):
    a, b = linked(), linked()
    alice, bob = join(a, "alice"), join(b, "bob")
    resend = hold_back_resends(a, monkeypatch)  # the worst moment: next beat comes late
    listening = hold_back_listener(b, monkeypatch, caplog)
    alice.send("/msg bob first")
    alice.expect("*** You whispered to bob: first")
    alice.send("sentinel")  # its XADD follows the PUBLISH on a's one connection
    bob.expect("alice says: sentinel")  # so the PUBLISH was done, and no one heard it
    listening.set()
    wait_until(lambda: subscribed(redis_server, b), message="b listens again")
    alice.send("/msg bob second")
    alice.expect("*** You whispered to bob: second")
    resend.set()
    got = [bob.expect("alice whispers:"), bob.expect("alice whispers:")]
    assert got == ["alice whispers: first", "alice whispers: second"]


@redis
def test_a_whisper_no_server_heard_in_time_is_owned_up_to(linked, join, monkeypatch, caplog):
    monkeypatch.setattr(chat_server, "REDIS_UNHEARD_SECONDS", 0.5)
    a, b = linked(), linked()
    alice = join(a, "alice")
    join(b, "bob")
    hold_back_listener(b, monkeypatch, caplog)  # b's listener never comes back
    alice.send("/msg bob anyone there")
    alice.expect("*** You whispered to bob: anyone there")
    alice.expect("*** Your whisper to bob did not arrive: their server was not listening.")


@redis
def test_a_mute_then_unmute_from_another_server_leaves_the_student_unmuted(
        linked, join, redis_server, monkeypatch, caplog):
    a, b = linked(), linked()
    join(a, "alice")
    bob = join(b, "bob")
    console = TeacherConsole(a, stream=None)
    resend = hold_back_resends(a, monkeypatch)
    listening = hold_back_listener(b, monkeypatch, caplog)
    console.handle_line("/mute bob")  # no one hears it: held for the next beat
    wait_until(lambda: a._link._unheard, message="the mute held as unheard")
    listening.set()
    wait_until(lambda: subscribed(redis_server, b), message="b listens again")
    console.handle_line("/unmute bob")  # heard at once
    resend.set()
    # In the teacher's order: muted, then unmuted (not: unmute ignored, then muted for good).
    bob.expect_next("*** The teacher has muted you")
    bob.expect_next("*** The teacher has unmuted you")


def test_a_line_said_as_its_sender_is_renamed_at_a_relink_carries_the_new_name(
        server, room, monkeypatch):
    """A relink renames a student (NAME.2) from the link's thread, at any moment:
    a line said just then is worded with the name the room gives them then."""
    alice, bob = room("alice", "bob")
    client = server.find("bob")
    real_wait = server._wait_for_room_budget

    def renamed_by_the_link_meanwhile(speaker, lines):
        real_wait(speaker, lines)
        if speaker is client and speaker.name == "bob":
            with server._lock:  # as RedisLink._rename_taken() does it
                server._remove_client(speaker)
                speaker.name, speaker.key, speaker.looks = (
                    "bob.2", chat_server.fold_name("bob.2"), chat_server.looks_of("bob.2"))
                server._add_client(speaker)

    events = []  # what the Redis link would be handed, as data
    real_broadcast = server._broadcast

    def broadcast(lines, exclude=None, event=None, notice=False):
        events.append(event)
        return real_broadcast(lines, exclude, event, notice)

    monkeypatch.setattr(server, "_wait_for_room_budget", renamed_by_the_link_meanwhile)
    monkeypatch.setattr(server, "_broadcast", broadcast)
    bob.send("hello")
    alice.expect_next("bob.2 says: hello")
    assert [event["name"] for event in events if event and event["k"] == "say"] == ["bob.2"]
