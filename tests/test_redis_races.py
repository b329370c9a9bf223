"""Linked servers: races with another server that a step in two commands would lose.

Each test makes the other server's move at the worst moment, right after
this server's link sends its first command of a step, and shows that the
step is one command that Redis runs whole.
"""

import json

import chat_server
from conftest import wait_until
from test_redis import fast_link, linked, linked_servers, redis, redis_server  # noqa: F401

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
