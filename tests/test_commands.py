"""The students' commands: /help /nick /who /me /msg /quit, over real sockets."""

import pytest

from conftest import server_process, wait_until


def test_help_lists_every_command_and_who_can_see_the_chat(joined):
    alice = joined("alice")
    alice.send("/help")
    alice.expect_next("*** Commands:")
    listed = []
    while not listed or "teacher sees the chat" not in listed[-1]:
        listed.append(alice.read_line())
    text = "\n".join(listed)  # only what /help said, not the welcome before it
    for command in ("/help", "/nick NEWNAME", "/who", "/me ACTION", "/msg NAME TEXT",
                    "/quit [REASON]", "//text"):
        assert "***   " + command in text


@pytest.mark.parametrize("typed", ["/HELP", "/Help", "  /help  ", "/help   extra"])
def test_command_names_ignore_case_and_extra_spaces(joined, typed):
    alice = joined("alice")
    alice.send(typed)
    alice.expect_next("*** Commands:")


def test_nick_renames_and_everyone_sees_it(room):
    alice, bob = room("alice", "bob")
    bob.send("/nick robert")
    alice.expect_next("*** bob is now robert.")
    bob.expect_next("*** bob is now robert.")
    bob.send("hi")
    alice.expect_next("robert says: hi")
    alice.send("/who")
    alice.expect_next("*** Online now (2): alice, robert")


def test_nick_frees_the_old_name_at_once(room, connect):
    alice, bob = room("alice", "bob")
    bob.send("/nick robert")
    bob.expect_next("is now robert")
    newcomer = connect()
    newcomer.send("bob")
    newcomer.expect("*** Welcome, bob!")


def test_nick_to_another_case_of_ones_own_name_is_allowed(room):
    alice, bob = room("alice", "bob")
    bob.send("/nick Bob")
    alice.expect_next("*** bob is now Bob.")


def test_nick_to_the_same_name_is_refused(joined):
    bob = joined("bob")
    bob.send("/nick bob")
    bob.expect_next("*** You are already called bob.")


@pytest.mark.parametrize(
    "new_name, reason",
    [("ALICE", "The name alice is taken."), ("ａｌｉｃｅ", "The name alice is taken."),
     ("admin", "reserved"), ("two words", "only letters"), ("x" * 21, "too long"),
     ("", "Usage: /nick")],
    ids=["taken in another case", "taken in full width", "reserved", "invalid",
         "too long", "missing"],
)
def test_nick_follows_the_name_rules(room, new_name, reason):
    alice, bob = room("alice", "bob")
    bob.send("/nick " + new_name)
    bob.expect_next(reason)


def test_nick_rate_zero_allows_any_number_of_renames():
    with server_process("--nick-rate", "0") as server:
        alice, bob = server.join("alice"), server.join("bob")
        alice.expect_next("*** bob joined the chat.")
        for number in range(6):
            bob.send("/nick b%d" % number)
            alice.expect_next("is now b%d." % number)
        alice.close()
        bob.close()


def test_nick_is_limited_per_minute(start_server, room):
    server = start_server(nick_rate=2)
    alice, bob = room("alice", "bob", target=server)
    bob.send("/nick b1")
    bob.send("/nick b2")
    bob.send("/nick b3")
    bob.expect_next("is now b1")
    bob.expect_next("is now b2")
    bob.expect_next("*** You can change your name at most 2 times a minute.")
    alice.expect_next("is now b1")
    alice.expect_next("is now b2")
    alice.expect_nothing_before(bob)


def test_a_refused_rename_does_not_count_against_the_limit(start_server, room):
    server = start_server(nick_rate=1)
    alice, bob = room("alice", "bob", target=server)
    bob.send("/nick alice")  # taken: refused, so not a rename
    bob.expect_next("*** ")
    bob.send("/nick b1")
    bob.expect_next("*** bob is now b1.")
    alice.expect_next("*** bob is now b1.")


def test_who_lists_everyone_alphabetically_with_a_count(room):
    carol, alice, Bob = room("carol", "alice", "Bob")
    alice.send("/who")
    alice.expect_next("*** Online now (3): alice, Bob, carol")


def test_who_no_longer_lists_those_who_left(room):
    alice, bob, carol, dave = room("alice", "bob", "carol", "dave")
    bob.send("/quit")
    alice.expect_next("*** bob left the chat.")
    carol.send("/quit")
    alice.expect_next("*** carol left the chat.")
    alice.send("/who")
    alice.expect_next("*** Online now (2): alice, dave")


def test_who_never_lists_someone_whose_leave_came_before_it(server, room, monkeypatch):
    """A list made, then a leave, then the list sent: it would name the one who left."""
    alice, bob = room("alice", "bob")
    real_who = type(server).who

    def who_then_bob_leaves(room_itself):
        line = real_who(room_itself)
        bob.close()
        wait_until(lambda: "bob" not in real_who(room_itself), message="bob gone")
        return line

    monkeypatch.setattr(type(server), "who", who_then_bob_leaves)
    alice.send("/who")
    first = alice.expect_next("")
    if first == "*** bob left the chat.":
        assert alice.expect_next("") == "*** Online now (1): alice"
    else:
        assert first == "*** Online now (2): alice, bob"


def test_me_shows_an_action_to_the_others(room):
    alice, bob = room("alice", "bob")
    bob.send("/me waves hello")
    alice.expect_next("* bob waves hello")
    alice.send("sentinel")
    bob.expect_next("alice says: sentinel")  # bob did not get his own action


def test_me_without_an_action_is_an_error_not_a_broadcast(room):
    alice, bob = room("alice", "bob")
    bob.send("/me")
    bob.expect_next("*** Usage: /me ACTION")
    alice.expect_nothing_before(bob)


def test_msg_reaches_only_its_target_and_confirms(room):
    alice, bob, carol = room("alice", "bob", "carol")
    alice.send("/msg Bob meet me at lunch")
    bob.expect_next("alice whispers: meet me at lunch")
    alice.expect_next("*** You whispered to bob: meet me at lunch")
    carol.expect_nothing_before(bob)


@pytest.mark.parametrize(
    "typed, reason",
    [("/msg nobody hi", "No one called nobody is online"), ("/msg bob", "Usage: /msg"),
     ("/msg", "Usage: /msg"), ("/msg bob    ", "Usage: /msg"),
     ("/msg ALICE note to self", "That is you: /msg is for someone else.")],
    ids=["unknown name", "no text", "nothing", "blank text", "to yourself"],
)
def test_msg_errors_are_clear(room, typed, reason):
    alice, bob = room("alice", "bob")
    alice.send(typed)
    alice.expect_next(reason)
    bob.expect_nothing_before(alice)


def test_private_messages_go_through_the_flood_limit(start_server, room):
    server = start_server(flood_rate=50, flood_burst=2)
    alice, bob = room("alice", "bob", target=server)
    alice.send_raw(b"".join(b"/msg bob n%d\r\n" % n for n in range(6)))
    alice.expect("*** You are sending lines too fast")
    for n in range(6):
        bob.expect_next("alice whispers: n%d" % n)


def test_quit_with_a_reason_shows_it_to_the_others(room):
    alice, bob = room("alice", "bob")
    bob.send("/quit time for lunch")
    assert bob.expect_closed() == ["*** Bye."]
    alice.expect_next("*** bob left the chat. (time for lunch)")


@pytest.mark.parametrize("shown, says", [(False, "(not private messages)"),
                                         (True, "(private messages too)")],
                         ids=["by default", "with --transcript-private"])
def test_help_says_whether_the_teacher_sees_private_messages(start_server, joined, shown, says):
    server = start_server(transcript_private=shown)
    alice = joined("alice", server)
    alice.send("/help")
    assert alice.expect("teacher sees the chat").endswith(says + ".")
