"""The pure text helpers: framing, telnet, cleaning, names, rate limits. No sockets."""

import pytest

from chat_server import (
    TOO_LONG,
    FloodLimiter,
    LineFramer,
    RateWindow,
    TelnetFilter,
    clean_line,
    fold_name,
    name_problem,
    skeleton,
)

IAC, DO, DONT, WILL, WONT, SB, SE, IP = 255, 253, 254, 251, 252, 250, 240, 244
BINARY = 0
ECHO, TIMING_MARK, NAWS = 1, 6, 31


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def frame(*reads, max_bytes=1024):
    framer = LineFramer(max_bytes)
    lines = []
    for data in reads:
        lines.extend(framer.feed(data))
    return lines


# --- Framing ---

@pytest.mark.parametrize(
    "reads, lines",
    [
        ([b"hi\n"], [b"hi"]),
        ([b"hi\r\n"], [b"hi"]),
        ([b"hi\r\0"], [b"hi"]),
        ([b"hi\r"], [b"hi"]),
        ([b"one\rtwo\r"], [b"one", b"two"]),
        ([b"one\r\0two\r\0"], [b"one", b"two"]),
        ([b"hi\r", b"\nthere\n"], [b"hi", b"there"]),
        ([b"hi\r", b"\0there\n"], [b"hi", b"there"]),
        ([b"he", b"llo\n"], [b"hello"]),
        ([b"\n\n"], [b"", b""]),
        ([b"no end yet"], []),
    ],
    ids=["LF", "CR LF", "CR NUL", "bare CR", "two bare CRs", "two CR NULs", "CR LF split",
         "CR NUL split", "line split", "empty lines", "partial line"],
)
def test_framer_ends_lines_the_way_clients_send_them(reads, lines):
    assert frame(*reads) == lines


def test_framer_keeps_a_line_of_exactly_the_limit():
    assert frame(b"x" * 1024 + b"\n") == [b"x" * 1024]


def test_framer_keeps_a_line_of_exactly_the_limit_whose_end_comes_in_a_later_read():
    assert frame(b"x" * 1024, b"\r\n") == [b"x" * 1024]
    assert frame(b"x" * 1000, b"x" * 24, b"\n") == [b"x" * 1024]


def test_framer_rejects_a_line_one_byte_over_the_limit_whose_end_comes_later():
    assert frame(b"x" * 1000, b"x" * 25, b"\nnext\n") == [TOO_LONG, b"next"]


def test_framer_rejects_a_line_one_byte_over_the_limit():
    assert frame(b"x" * 1025 + b"\nnext\n") == [TOO_LONG, b"next"]


def test_framer_reports_a_long_line_before_it_ends_and_discards_the_rest():
    framer = LineFramer(10)
    assert framer.feed(b"x" * 11) == [TOO_LONG]
    assert framer.feed(b"y" * 5000) == []
    assert framer.feed(b"zz\r\nok\n") == [b"ok"]


# --- Telnet ---

def test_telnet_filter_passes_plain_text_untouched():
    assert TelnetFilter().feed(b"hello\r\n") == (b"hello\r\n", b"")


def test_telnet_filter_refuses_do_with_wont_and_will_with_dont():
    telnet = TelnetFilter()
    text, answer = telnet.feed(bytes([IAC, DO, ECHO, IAC, WILL, NAWS]) + b"hi\r\n")
    assert text == b"hi\r\n"
    assert answer == bytes([IAC, WONT, ECHO, IAC, DONT, NAWS])


def test_telnet_filter_never_answers_a_refusal():
    telnet = TelnetFilter()
    assert telnet.feed(bytes([IAC, WONT, ECHO, IAC, DONT, ECHO])) == (b"", b"")


def test_telnet_filter_answers_ctrl_c_timing_mark():
    telnet = TelnetFilter()
    text, answer = telnet.feed(bytes([IAC, IP, IAC, DO, TIMING_MARK]))
    assert (text, answer) == (b"", bytes([IAC, WONT, TIMING_MARK]))
    assert telnet.interrupted


def test_telnet_filter_refuses_binary_like_any_option():
    """SPEC: every DO x gets WONT x, every WILL x DONT x; no negotiation of ours."""
    text, answer = TelnetFilter().feed(bytes([IAC, WILL, BINARY, IAC, DO, BINARY]))
    assert answer == bytes([IAC, DONT, BINARY, IAC, WONT, BINARY])


def test_telnet_filter_reads_a_letter_linux_telnet_sent_as_commands_as_that_letter():
    """Out of BINARY mode, inetutils telnet sends the 0x83 of "у" as IAC IP (and asks
    for a timing mark), the 0x8F of "я" as IAC AO, the 0x9C of "本" as IAC BRK."""
    telnet = TelnetFilter()
    data = (b"\xd1" + bytes([IAC, IP, IAC, DO, TIMING_MARK]) + b"\xd1" + bytes([IAC, 245])
            + b"\xe6" + bytes([IAC, 243]) + b"\xac\r\n")
    text, answer = telnet.feed(data)
    assert text.decode("utf-8") == "уя本\r\n"
    assert not telnet.interrupted


@pytest.mark.parametrize("typed", ["caf\u00e9", "\u672c", "\U0001f600"],
                         ids=["two bytes", "three bytes", "four bytes"])
def test_telnet_filter_takes_ctrl_c_right_after_a_whole_letter_as_ctrl_c(typed):
    """Only a command inside a letter is a mangled byte of that letter."""
    telnet = TelnetFilter()
    text, answer = telnet.feed(typed.encode("utf-8") + bytes([IAC, IP]))
    assert (text.decode("utf-8"), telnet.interrupted) == (typed, True)


def test_telnet_filter_reads_a_mangled_letter_split_across_reads():
    telnet = TelnetFilter()
    assert telnet.feed(b"\xcf") == (b"\xcf", b"")
    text, answer = telnet.feed(bytes([IAC, IP]))
    assert (text, telnet.interrupted) == (b"\x83", False)


def test_telnet_filter_drops_subnegotiation():
    data = bytes([IAC, SB, NAWS, 0, 80, 0, 24, IAC, SE]) + b"ok"
    assert TelnetFilter().feed(data) == (b"ok", b"")


def test_telnet_filter_drops_a_subnegotiation_holding_a_doubled_iac():
    """A window 255 columns wide is sent as IAC IAC inside the subnegotiation."""
    data = bytes([IAC, SB, NAWS, 0, IAC, IAC, 0, 24, IAC, SE]) + b"ok"
    assert TelnetFilter().feed(data) == (b"ok", b"")


def test_telnet_filter_handles_a_command_split_across_reads():
    telnet = TelnetFilter()
    assert telnet.feed(b"a" + bytes([IAC])) == (b"a", b"")
    assert telnet.feed(bytes([DO])) == (b"", b"")
    assert telnet.feed(bytes([ECHO]) + b"b") == (b"b", bytes([IAC, WONT, ECHO]))


def test_telnet_filter_turns_doubled_iac_into_one_byte():
    assert TelnetFilter().feed(bytes([IAC, IAC])) == (bytes([IAC]), b"")


# --- Cleaning ---

@pytest.mark.parametrize(
    "raw, text",
    [
        (b"caf\xc3\xa9", "café"),
        (b"bad \xff\xfe bytes", "bad \ufffd\ufffd bytes"),
        ("naïve".encode() + b"\x7f\x7fve", "naïve"),
        ("日本".encode() + b"\x08", "日"),
        (b"\x08\x08x", "x"),
        (b"up\x1b[Aarrow", "uparrow"),
        (b"\x1b[2J\x1b[Hcleared", "cleared"),
        (b"\x1b[1;31mred\x1b[0m", "red"),
        (b"\x1b]0;pwned\x07title", "title"),
        (b"\x1b]0;unterminated title", ""),
        (b"\x1bcreset", "reset"),
        (b"ding\x07", "ding"),
        (b"a\tb", "a b"),
        ("c1\u009b31m".encode(), "c1"),
        ("\u202eevil".encode(), "evil"),
        (b"nul\x00byte", "nulbyte"),
        ("ok\u20282026-11-30 09:00:00 alice says: I cheated\u2029end".encode(),
         "ok 2026-11-30 09:00:00 alice says: I cheated end"),
    ],
    ids=["utf-8", "invalid utf-8", "DEL over multibyte", "backspace over CJK",
         "backspace at start", "arrow key", "clear screen", "colour", "OSC title",
         "unterminated OSC", "ESC c reset", "bell", "tab", "C1 CSI", "bidi override",
         "NUL", "line and paragraph separators (a forged transcript line)"],
)
def test_clean_line_leaves_only_safe_text(raw, text):
    assert clean_line(raw) == text


# --- Names ---

@pytest.mark.parametrize(
    "name", ["alice", "Bob_2", "a.b-c", "Zoë", "Ж", "李小龙", "x" * 20, "é", "١٢٣",
             "observer", "badminton", "Ada.Lovelace",  # "server", "admin" inside a word
             "Joe.Root", "JoeRoot"],  # root is reserved alone only: a surname too
)
def test_valid_names_are_accepted(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "at least one"),
        ("x" * 21, "too long"),
        ("two words", "only letters"),
        ("semi;colon", "only letters"),
        ("smile☺", "only letters"),
        ("\u0301accent", "only letters"),
        ("Teacher", "reserved"),
        ("ＡＤＭＩＮ", "reserved"),
        ("the.teacher", "reserved"),
        ("MrTeacher", "reserved"),
        ("teacher_assistant", "reserved"),
        ("server.bot", "reserved"),
        ("TEACHERbob", "reserved"),
        ("127.0.0.9", "not be, or look like, an address"),
        ("l0.O.0.9", "not be, or look like, an address"),
        ("\uff11\uff10.\uff10.\uff10.\uff19", "not be, or look like, an address"),
    ],
    ids=["empty", "21 characters", "space", "punctuation", "symbol",
         "starts with a mark", "reserved", "reserved in full width",
         "a reserved word after another", "a reserved word after a capital",
         "a reserved word before another", "a reserved word, then a dot",
         "a reserved word in capitals, then small letters",
         "an IP address",
         "an IP address in look-alike letters", "an IP address in full width"],
)
def test_invalid_names_are_refused_with_a_reason(name, reason):
    assert reason in name_problem(name)


def test_names_that_differ_in_case_or_width_fold_to_one_key():
    assert fold_name("Alice") == fold_name("alice") == fold_name("ａｌｉｃｅ")


def test_names_that_differ_in_case_fold_to_one_key_when_folding_undoes_normalisation():
    """Capital J with a caron has no single character: casefold leaves j, a mark
    below and the caron, which only a second NFKC turns into the j with caron
    that the lower-case name starts with."""
    assert fold_name("J\u0316\u030c") == fold_name("\u01f0\u0316")


@pytest.mark.parametrize("name, look_alike", [("mary", "rnary"), ("wendy", "vvendy")])
def test_letters_that_together_look_like_another_letter_share_a_skeleton(name, look_alike):
    """rn looks like m and vv like w in most terminal fonts: both cannot be online."""
    assert skeleton(look_alike) == skeleton(name)


@pytest.mark.parametrize("name, look_alike", [("hugo", "\u0570\u057d\u0581\u0585"),
                                              ("boris", "bo\u0433is")],
                         ids=["Armenian", "Cyrillic ge"])
def test_armenian_and_cyrillic_letters_drawn_as_latin_ones_share_a_skeleton(name, look_alike):
    assert skeleton(look_alike) == skeleton(name)


@pytest.mark.parametrize("look_alike", ["b\u09e6b", "b\u0a66b", "b\u07c0b"],
                         ids=["Bengali zero", "Gurmukhi zero", "NKo zero"])
def test_a_digit_of_any_script_looks_like_the_digit_it_stands_for(look_alike):
    """০ is a zero, and a zero looks like o: b০b cannot join while bob is online."""
    assert skeleton(look_alike) == skeleton("bob")


def test_different_names_keep_different_keys():
    assert fold_name("alice") != fold_name("alicia")


# --- Rate limits ---

def test_flood_limiter_lets_a_burst_through_then_spaces_lines_out():
    clock = FakeClock()
    limiter = FloodLimiter(rate=5, burst=10, clock=clock)
    assert [limiter.delay_for() for _ in range(10)] == [0.0] * 10
    assert limiter.delay_for() == pytest.approx(0.2)
    assert limiter.delay_for() == pytest.approx(0.4)


def test_flood_limiter_refills_with_time():
    clock = FakeClock()
    limiter = FloodLimiter(rate=5, burst=10, clock=clock)
    for _ in range(10):
        limiter.delay_for()
    clock.now += 1.0
    assert [limiter.delay_for() for _ in range(5)] == [0.0] * 5
    assert limiter.delay_for() > 0


def test_flood_limiter_saves_up_no_more_than_one_burst():
    clock = FakeClock()
    limiter = FloodLimiter(rate=5, burst=10, clock=clock)
    clock.now += 3600  # an hour of silence
    assert [limiter.delay_for() for _ in range(10)] == [0.0] * 10
    assert limiter.delay_for() == pytest.approx(0.2)


def test_flood_limiter_take_if_free_takes_only_whole_tokens():
    clock = FakeClock()
    limiter = FloodLimiter(rate=5, burst=2, clock=clock)
    assert [limiter.take_if_free() for _ in range(3)] == [True, True, False]
    clock.now += 0.1  # half a token
    assert not limiter.take_if_free()
    clock.now += 0.15  # more than a whole one
    assert limiter.take_if_free()
    assert not limiter.take_if_free()


def test_flood_limiter_delays_a_line_after_one_that_took_a_free_token():
    clock = FakeClock()
    limiter = FloodLimiter(rate=5, burst=1, clock=clock)
    assert limiter.take_if_free()
    assert limiter.delay_for() == pytest.approx(0.2)


def test_flood_limiter_with_rate_zero_never_delays():
    limiter = FloodLimiter(rate=0, burst=1, clock=FakeClock())
    assert all(limiter.delay_for() == 0 for _ in range(100))


def test_rate_window_allows_the_limit_then_refuses_until_the_window_passes():
    clock = FakeClock()
    renames = RateWindow(3, 60, clock=clock)
    assert [renames.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 60
    assert renames.allow()


def test_rate_window_forgets_each_event_one_window_after_it():
    clock = FakeClock()
    renames = RateWindow(2, 60, clock=clock)
    assert renames.allow()
    clock.now += 30
    assert renames.allow()
    assert not renames.allow()  # refused attempts do not count
    clock.now += 29.9
    assert not renames.allow()
    clock.now += 0.1  # the first is now 60 s old
    assert renames.allow()
    assert not renames.allow()


def test_rate_window_with_limit_zero_never_refuses():
    renames = RateWindow(0, 60, clock=FakeClock())
    assert all(renames.allow() for _ in range(100))
