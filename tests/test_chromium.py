"""The chat page in a real browser: Chromium, headless, driven over its DevTools protocol.

The tests start Debian's chromium themselves (skipped when it is missing,
failed when CHAT_TESTS_REQUIRE names it) and speak DevTools (CDP) with the
tests' own WebSocket client: no Python package beyond pytest.
"""

import base64
import json
import os
import re
import subprocess
import time

import pytest

import chat_server
from conftest import TIMEOUT, console_lines, find_tool, wait_until
from websocket_client import WebSocketClient

pytestmark = pytest.mark.browser

CHROMIUM_START_SECONDS = 30  # a cold start on a loaded CI machine
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
SCREENSHOT_DIR = os.environ.get("CHAT_SCREENSHOTS", "/tmp")


class DevTools:
    """One DevTools connection to the browser; call() waits for the answer."""

    def __init__(self, port, path):
        self.ws = WebSocketClient("127.0.0.1", port, path, origin=False, timeout=TIMEOUT)
        self.last_id = 0

    def call(self, method, session=None, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send_text(json.dumps(message))
        deadline = time.monotonic() + TIMEOUT
        while True:  # events arrive in between: skip them
            reply = json.loads(self.ws.recv_message(max(0.001, deadline - time.monotonic())))
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise AssertionError("%s failed: %r" % (method, reply["error"]))
                return reply["result"]


class Tab:
    """A browser tab showing the chat page."""

    def __init__(self, devtools, url, metrics=DESKTOP):
        self.devtools = devtools
        self.target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = devtools.call("Target.attachToTarget", targetId=self.target,
                                     flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", **metrics)
        self.call("Page.navigate", url=url)

    def call(self, method, **params):
        return self.devtools.call(method, self.session, **params)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %r" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def log_lines(self):
        return self.evaluate("Array.from(document.querySelectorAll('#log div'),"
                             " d => [d.className, d.textContent])") or []

    def wait_for_line(self, text):
        wait_until(lambda: any(text in line for _, line in self.log_lines()),
                   message="%r on the page; it shows %r" % (text, self.log_lines()))

    def type_line(self, text):
        """Type text into the focused box and press Enter, as a student would."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def status(self):
        return self.evaluate("(document.getElementById('status') || {}).textContent")

    def screenshot(self, name):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = os.path.join(SCREENSHOT_DIR, "chat-%s.png" % name)
        with open(path, "wb") as image:
            image.write(base64.b64decode(data))
        return path

    def close(self):
        self.devtools.call("Target.closeTarget", targetId=self.target)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A headless Chromium for this module; killed (by its PID) at the end."""
    path = find_tool("chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with open(profile / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-port=0",
             "--user-data-dir=%s" % profile, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and len(port_file.read_text().split()) == 2
                   or process.poll() is not None,
                   timeout=CHROMIUM_START_SECONDS, message="Chromium's DevToolsActivePort")
        if process.poll() is not None:
            pytest.fail("chromium exited: %s" % (profile / "stderr.txt").read_text()[-2000:])
        port, browser_path = port_file.read_text().split()
        devtools = DevTools(int(port), browser_path)
        yield devtools
        devtools.ws.shutdown()
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)


@pytest.fixture
def open_tab(chromium):
    """A factory: open_tab(server, metrics=DESKTOP) loads the chat page in a new tab."""
    tabs = []

    def make(server, metrics=DESKTOP, first_prompt="What is your name?"):
        host, port = server.server_address[:2]
        tab = Tab(chromium, "http://%s:%d/" % (host, port), metrics)
        tabs.append(tab)
        wait_until(lambda: tab.status() == "Connected", message="the page to connect")
        tab.wait_for_line(first_prompt)
        return tab

    yield make
    for tab in tabs:
        tab.close()


@pytest.fixture
def tab_beside(open_tab, joined):
    """A factory: tab_beside(server, "bob") joins bob over TCP, then alice in a
    new tab (metrics: DESKTOP, or PHONE); returns (bob, tab) once bob has read
    alice's join line."""

    def make(server, classmate, metrics=DESKTOP):
        student = joined(classmate, server)
        tab = open_tab(server, metrics)
        tab.type_line("alice")
        student.expect("*** alice joined the chat.")
        return student, tab

    return make


def test_page_joins_and_chats_with_an_nc_student(server, tab_beside):
    bob, tab = tab_beside(server, "bob")
    tab.type_line("hello from chromium")
    bob.expect_next("alice says: hello from chromium")
    bob.send("hello, alice")
    tab.wait_for_line("bob says: hello, alice")
    lines = tab.log_lines()
    assert ["mine", "hello from chromium"] in lines  # what the student sent
    assert ["server", "*** alice joined the chat."] not in lines  # not sent to oneself
    assert ["said", "bob says: hello, alice"] in lines
    assert all(kind == "server" for kind, text in lines if text.startswith("*** "))
    assert tab.evaluate("document.activeElement.id") == "line"
    tab.screenshot("desktop")


def test_another_students_script_is_shown_as_text(server, tab_beside):
    bob, tab = tab_beside(server, "bob")
    attack = '<script>document.title="owned"</script><img src=x onerror=alert(1)><b>b</b>'
    bob.send(attack)
    tab.wait_for_line("bob says: <script>")
    assert ["said", "bob says: " + attack] in tab.log_lines()
    assert tab.evaluate("document.querySelectorAll('#log script, #log img, #log b').length") == 0
    assert tab.evaluate("document.title") == "Classroom chat"


def test_a_leave_reason_is_drawn_as_the_students_words_not_the_servers(server, tab_beside):
    """`*** kim left the chat. ([teacher] go home)`: the part in brackets is kim's."""
    kim, tab = tab_beside(server, "kim")
    kim.send("/quit [teacher] the test is cancelled, go home")
    tab.wait_for_line("*** kim left the chat. ([teacher] the test is cancelled, go home)")
    words, colours = tab.evaluate(
        "(() => { const line = Array.from(document.querySelectorAll('#log .server'))"
        ".find(div => div.textContent.startsWith('*** kim left'));"
        " const words = line.querySelector('.words');"
        " return [words.textContent, [getComputedStyle(line).color,"
        " getComputedStyle(words).color]]; })()")
    assert words == "([teacher] the test is cancelled, go home)"
    assert colours[0] != colours[1]


def test_reloads_load_the_page_in_a_lab_that_shares_one_address(
        start_server, open_tab, caplog):
    """With --per-address 0 a browser's spare connection, opened as the page
    loads, must still wait for its request, or the next reload fails."""
    server = start_server(per_address=0)
    tab = open_tab(server)

    def loaded_again():
        return not tab.evaluate("window.beforeReload") and tab.status() == "Connected" \
            and any("What is your name?" in line for _, line in tab.log_lines())

    for _ in range(4):
        # A student's pause before pressing Reload: long enough for a spare
        # connection greeted like nc (after BROWSER_WAIT_SECONDS) to have its prompt.
        time.sleep(4 * chat_server.BROWSER_WAIT_SECONDS)
        tab.evaluate("window.beforeReload = true")  # gone with this page
        tab.call("Page.reload")
        deadline = time.monotonic() + TIMEOUT
        while not loaded_again() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the page
        assert loaded_again(), (tab.evaluate("document.body && document.body.innerText"),
                          console_lines(caplog))
    assert not [line for line in console_lines(caplog) if "came after the first prompt" in line]


def test_a_line_padded_to_wrap_goes_on_indented_not_as_a_line_of_its_own(server, tab_beside):
    """Spaces are kept (pasted code needs them): a wrapped row must not pass for a line."""
    bob, tab = tab_beside(server, "bob")
    bob.send("ok" + " " * 400 + "alice says: I did not do the homework")
    tab.wait_for_line("I did not do the homework")
    first, last = tab.evaluate(
        "(() => { const div = Array.from(document.querySelectorAll('#log div'))"
        ".find(d => d.textContent.includes('the homework'));"
        " const range = document.createRange(); range.selectNodeContents(div);"
        " const rows = Array.from(range.getClientRects()).filter(r => r.width > 0);"
        " return [rows[0].left, rows[rows.length - 1].left]; })()")
    assert last > first + 8, (first, last)


def test_kick_shows_disconnected_and_join_again_works_from_the_keyboard(
        start_server, open_tab):
    server = start_server(ban_minutes=0)
    tab = open_tab(server)
    tab.type_line("alice")
    tab.wait_for_line("Online now")
    chat_server.TeacherConsole(server, None).handle_line("/kick alice time out")
    wait_until(lambda: tab.status() == "Disconnected", message="the disconnected state")
    tab.wait_for_line("removed you from the chat: time out")
    assert tab.evaluate("document.getElementById('again').hidden") is False
    assert tab.evaluate("document.activeElement.id") == "rejoin"
    tab.screenshot("disconnected")
    tab.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
             windowsVirtualKeyCode=13, text="\r")
    tab.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter",
             windowsVirtualKeyCode=13)
    wait_until(lambda: tab.status() == "Connected", message="joining again")
    wait_until(lambda: [t for _, t in tab.log_lines()].count("*** What is your name?") == 2,
               message="a second name prompt")


def test_page_fits_a_phone_width(server, tab_beside):
    bob, tab = tab_beside(server, "bob", PHONE)
    bob.send("a long line that a phone must wrap instead of scrolling sideways " * 3)
    tab.wait_for_line("a long line")
    assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert tab.evaluate("window.innerWidth") == PHONE["width"]
    right = tab.evaluate("document.querySelector('#send button').getBoundingClientRect().right")
    assert right <= PHONE["width"]
    tab.screenshot("phone")


def test_password_box_is_masked_only_while_asked(start_server, open_tab):
    server = start_server(password="secret")
    tab = open_tab(server, first_prompt="Password?")
    assert tab.evaluate("document.getElementById('line').type") == "password"
    tab.type_line("secret")
    tab.wait_for_line("What is your name?")
    assert tab.evaluate("document.getElementById('line').type") == "text"
    assert "secret" not in [text for _, text in tab.log_lines()]


def test_a_teachers_line_ending_in_password_does_not_mask_the_box(server, tab_beside):
    bob, tab = tab_beside(server, "bob")
    chat_server.TeacherConsole(server, None).handle_line("What is the Wi-Fi Password?")
    tab.wait_for_line("*** [teacher] What is the Wi-Fi Password?")
    assert tab.evaluate("document.getElementById('line').type") == "text"


def test_the_page_knows_the_servers_password_question():
    assert '"%s"' % chat_server.PASSWORD_QUESTION in chat_server.PAGE_SCRIPT


def test_inline_script_and_style_pass_the_pages_own_csp(server, open_tab):
    """The page connected (its script ran) and is styled: the CSP hashes match."""
    tab = open_tab(server)
    assert tab.evaluate("getComputedStyle(document.getElementById('log')).overflowY") == "auto"


def test_log_follows_new_lines_unless_the_student_scrolled_up(start_server, tab_beside):
    server = start_server(flood_rate=0)
    bob, tab = tab_beside(server, "bob", PHONE)
    for number in range(40):
        bob.send("line %d" % number)
    tab.wait_for_line("line 39")
    at_bottom = ("(l => l.scrollHeight - l.scrollTop - l.clientHeight < 2)"
                 "(document.getElementById('log'))")
    assert tab.evaluate(at_bottom)
    tab.evaluate("document.getElementById('log').scrollTop = 0")
    bob.send("one more")
    tab.wait_for_line("one more")
    assert tab.evaluate("document.getElementById('log').scrollTop") == 0


@pytest.fixture
def full_page(start_server, tab_beside):
    """(server, bob, tab): alice's page has been sent 100 lines more than it keeps."""
    server = start_server(flood_rate=0)
    bob, tab = tab_beside(server, "bob")
    for number in range(chat_server.PAGE_LINES_KEPT + 100):
        bob.send("line %d" % number)
    tab.wait_for_line("line %d" % (chat_server.PAGE_LINES_KEPT + 99))
    return server, bob, tab


def test_the_page_keeps_only_its_newest_lines(full_page):
    """Each new line makes the browser lay out the log again: one that grew
    for a whole lesson would fall further and further behind."""
    server, bob, tab = full_page
    assert tab.evaluate("document.getElementById('log').childElementCount") == \
        chat_server.PAGE_LINES_KEPT
    assert tab.log_lines()[0][1] == "bob says: line 100"  # the oldest kept


TOP_LINE = ("(l => Array.from(l.children).find(d => d.getBoundingClientRect().top >= "
            "l.getBoundingClientRect().top).textContent)(document.getElementById('log'))")


def test_a_student_scrolled_up_keeps_their_place_as_old_lines_go(full_page):
    server, bob, tab = full_page
    tab.evaluate("document.getElementById('log').children[500].scrollIntoView()")
    reading = tab.evaluate(TOP_LINE)
    teacher = chat_server.TeacherConsole(server, None)
    for number in range(20):  # server lines too: their box is drawn apart
        bob.send("more %d" % number)
        teacher.handle_line("note %d" % number)
    tab.wait_for_line("note 19")
    assert tab.evaluate(TOP_LINE) == reading


def test_page_follows_the_systems_dark_setting(server, open_tab):
    tab = open_tab(server)
    background = "getComputedStyle(document.body).backgroundColor"
    light = tab.evaluate(background)
    tab.call("Emulation.setEmulatedMedia",
             features=[{"name": "prefers-color-scheme", "value": "dark"}])
    dark = tab.evaluate(background)
    assert light != dark
    assert sum(map(int, re.findall(r"\d+", dark))) < sum(map(int, re.findall(r"\d+", light)))
    tab.screenshot("dark")
