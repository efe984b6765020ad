"""The chat page (`GET /` for browsers) in a real browser: headless Chromium driven by playwright, against real
gunicorn with the emulated runner. Every page is watched (tests/helpers/browser.py): no console errors, no
script errors, no request to anywhere but the service. Screenshots of the main states go to the test run's
temporary folder, `screenshots/`."""
import re
import threading

import httpx
import pytest
from playwright.sync_api import expect

from tests.helpers import MODEL, LiveServer, answer_to, said, settings, wait_for
from tests.helpers.browser import PageWatch

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
LONG = ("Please read all this: " + "the card reads one token at a time. " * 12).strip()  # the page trims

expect.set_options(timeout=30_000)  # a waiting bound, not a goal: two shared cores, the card at its pace


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """The card at a pace slow enough to watch (20 ms a token); long answers allowed, so that one outlasts a
    test that stops it."""
    server = LiveServer(tmp_path_factory.mktemp("page-slow"),
                        settings(runner={"emulator": {"token_ms": 20}}, generation={"max_tokens": 900}))
    yield server.wait_healthy()
    server.stop()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def open_page(browser):
    """open_page(server, block=URL glob, **context options) -> (page, watch) on the server's `/`, with requests
    matching `block` failing; afterwards, the page must have made no request to anywhere else and shown no
    unexpected error."""
    opened = []

    def open_(server, block=None, **options):
        context = browser.new_context(**options)
        if block:
            context.route(block, lambda route: route.abort())
        page = context.new_page()
        watch = PageWatch(page)
        opened.append((context, watch, server.url))
        response = page.goto(server.url + "/")
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        return page, watch

    yield open_
    for context, watch, url in opened:
        context.close()
        assert watch.foreign_requests(url) == []
        assert watch.unexpected_errors() == []


def message_box(page):
    """The message box: the page's last text box."""
    return page.get_by_role("textbox").last


def send(page, text):
    box = message_box(page)
    box.fill(text)
    box.press("Enter")


def answer(page, index=-1):
    answers = page.locator(".turn.assistant .text")
    return answers.last if index == -1 else answers.nth(index)


def chat_bodies(page):
    """The JSON bodies of the page's chat requests, as they are sent (appended to as the page sends)."""
    bodies = []
    page.on("request", lambda request: request.url.endswith("/v1/chat/completions")
            and bodies.append(request.post_data_json))
    return bodies


def hold_card(server):
    """Another client streams a long answer until `release` is set; returns (thread, release)."""
    release = threading.Event()

    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count to 400"}]}

    def hold():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json=body) as r:
            for _ in r.iter_lines():
                if release.is_set():
                    return  # closing the stream frees the card

    holder = threading.Thread(target=hold)
    holder.start()
    server.wait_until_busy()
    return holder, release


def assert_no_json(text):
    """An error as a person reads it: the service's words, never its JSON."""
    assert not re.search(r'"(error|message|type|code|param)"\s*:', text), text


def record(page, script):
    """Start recording in the page: `script` is a function body that pushes onto window.recorded."""
    page.evaluate("() => { window.recorded = []; " + script + " }")
    return lambda: page.evaluate("() => window.recorded")


# -- GET / ----------------------------------------------------------------------------------------------------
def test_root_is_the_page_for_browsers_and_ollama_is_running_for_everyone_else(slow):
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}, {"Accept": "text/plain"}):
        response = httpx.get(slow.url + "/", headers=headers)
        assert response.text == "Ollama is running" and response.headers["content-type"].startswith("text/plain")
        assert "Accept" in response.headers["vary"]
    assert httpx.head(slow.url + "/").status_code == 200
    page = httpx.get(slow.url + "/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "no inline scripts"
    assert not re.search(r"\son\w+=|\sstyle=", page.text), "no inline handlers or styles"
    assert 'data-markdown="on"' in page.text  # scripts/setup put the libraries in place
    assert httpx.head(slow.url + "/", headers={"Accept": BROWSER_ACCEPT}).headers["content-security-policy"]


def test_without_the_libraries_the_page_says_so(app, client, tmp_path):
    folder = app.static_folder
    app.static_folder = str(tmp_path)  # an empty static folder: no vendor/ in it
    try:
        page = client.get("/", headers={"Accept": BROWSER_ACCEPT}).get_data(as_text=True)
    finally:
        app.static_folder = folder
    assert 'data-markdown="off"' in page


# -- the page -------------------------------------------------------------------------------------------------
def test_the_page_loads_with_everything_from_the_service(open_page, slow, screenshots):
    page, watch = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    expect(page.get_by_role("heading", name="qwen-chat")).to_be_visible()
    expect(page.locator("#model")).to_have_text("Qwen2.5-1.5B-Instruct")
    expect(page.locator("#health")).to_contain_text("Emulated card")
    box = message_box(page)
    expect(box).to_have_js_property("tagName", "TEXTAREA")
    expect(box).to_be_focused()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
    page.wait_for_load_state("networkidle")
    assert any(url.endswith("/static/vendor/marked.esm.js") for url in watch.requests)
    assert any(url.endswith("/static/vendor/purify.es.js") for url in watch.requests)
    page.screenshot(path=screenshots / "empty.png")


def test_a_conversation_streams_and_every_turn_is_sent(open_page, slow):
    page, _ = open_page(slow)
    bodies = chat_bodies(page)
    seen = record(page, """
        new MutationObserver(() => {
            const answers = document.querySelectorAll(".turn.assistant .text");
            if (answers.length) window.recorded.push(answers[answers.length - 1].textContent.trim());
        }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
    """)
    send(page, "hello, count to 20")
    expect(answer(page, 0)).to_have_text(answer_to("hello, count to 20"))
    partial = {text for text in seen() if text and text != answer_to("hello, count to 20")}
    assert len(partial) >= 2 and all(answer_to("hello, count to 20").startswith(text) for text in partial)
    expect(page.locator("#card-state")).to_have_text("Done.")
    expect(page.locator("#card-detail")).to_contain_text(re.compile(r"Prompt: \d+ tokens in .* answer: \d+ tokens"))
    expect(page.locator("#window-text")).to_have_text(re.compile(r"^[1-9]\d* of 1024 tokens$"))

    # Shift+Enter is a new line, Enter sends.
    box = message_box(page)
    box.type("second turn")
    box.press("Shift+Enter")
    box.type("on two lines")
    box.press("Enter")
    expect(answer(page, 1)).to_have_text(said("second turn\non two lines"), use_inner_text=True)
    assert [m["content"] for m in bodies[1]["messages"]] == [
        "hello, count to 20", answer_to("hello, count to 20"), "second turn\non two lines"]
    assert bodies[1]["stream"] is True and bodies[1]["return_progress"] is True
    assert bodies[1]["stream_options"] == {"include_usage": True}

    # The system prompt goes first; "New chat" starts again with nothing before.
    page.locator("summary", has_text="System prompt").click()
    page.get_by_label("System prompt").fill("Be brief.")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "fresh start")
    expect(answer(page, 0)).to_have_text(said("fresh start"))
    assert bodies[2]["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "fresh start"}]


def test_a_reload_keeps_the_conversation_and_new_chat_forgets_it(open_page, slow, tokenizer, screenshots):
    page, _ = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    bodies = chat_bodies(page)
    shown = answer_to("remember **this**, count to 3").replace("**", "")  # as Markdown shows it
    send(page, "remember **this**, count to 3")
    expect(answer(page)).to_have_text(shown)
    holder, release = hold_card(slow)
    try:
        send(page, "stopped while waiting")
        expect(page.locator("#card-state")).to_contain_text("Waiting in the queue")
        page.keyboard.press("Escape")  # no answer: the message is withdrawn, and so not kept
        expect(page.locator(".turn.user.withdrawn")).to_have_count(1)
    finally:
        release.set()
        holder.join(60)

    page.reload()
    expect(page.locator(".turn.user .text")).to_have_text(["remember **this**, count to 3"])
    expect(answer(page)).to_have_text(shown)
    expect(answer(page).locator("strong")).to_have_text("this")  # Markdown again, through the same sanitiser
    expect(page.get_by_role("button", name="Copy answer")).to_have_count(1)
    kept = [{"role": "user", "content": "remember **this**, count to 3"},
            {"role": "assistant", "content": answer_to("remember **this**, count to 3")}]
    expect(page.locator("#window-text")).to_have_text(f"{len(tokenizer.chat_ids(kept, ending='none'))} of 1024 tokens")
    page.screenshot(path=screenshots / "reloaded.png")
    send(page, "after the reload")
    expect(answer(page)).to_have_text(said("after the reload"))
    assert [(m["role"], m["content"]) for m in bodies[-1]["messages"]] == [
        ("user", "remember **this**, count to 3"), ("assistant", answer_to("remember **this**, count to 3")),
        ("user", "after the reload")]

    page.get_by_role("button", name="New chat").click()
    page.reload()
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator(".turn")).to_have_count(0)

    # Whatever else is stored under the name starts an empty conversation, and shows nothing as markup.
    page.evaluate("""() => localStorage.setItem("qwen-chat.conversation", JSON.stringify(
        [{role: "system", content: "x"}, {role: "user", content: "<img src=x onerror=alert(1)>"}, {role: 7}]))""")
    page.reload()
    expect(page.locator(".turn.user .text")).to_have_text(["<img src=x onerror=alert(1)>"])
    expect(page.locator(".turn")).to_have_count(1)
    page.evaluate("() => localStorage.setItem('qwen-chat.conversation', '{not json')")
    page.reload()
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "works")
    expect(answer(page)).to_have_text(said("works"))


def test_model_text_cannot_inject_markup(open_page, slow):
    page, watch = open_page(slow)
    text = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> **bold** '
            "[link](javascript:window.pwned=3) ![pic](http://198.51.100.7/pic.png)")
    send(page, text)
    expect(answer(page)).to_contain_text('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">')
    expect(answer(page).locator("strong")).to_have_text("bold")  # Markdown is rendered, HTML is not
    page.locator(".turn.assistant .copy").first.wait_for()  # the answer is complete
    assert page.locator("#conversation script, #conversation img, #conversation [onerror]").count() == 0
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("#conversation a[href^='javascript']").count() == 0
    assert not [url for url in watch.requests if url.endswith("/x")]


def test_an_answer_with_a_code_block_and_a_list(open_page, slow, screenshots):
    page, _ = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    text = "Show me:\n```python\nfor i in range(3):\n    print(i)\n```\n- one\n- two"
    send(page, text)
    expect(answer(page).locator("pre code")).to_have_text("for i in range(3):\n    print(i)")
    expect(answer(page).locator("li")).to_have_count(2)
    page.get_by_role("button", name="Copy answer").click()
    expect(page.get_by_role("button", name="Copy answer")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == said(text)
    page.get_by_role("button", name="Copy code").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "for i in range(3):\n    print(i)\n"
    page.screenshot(path=screenshots / "code-block.png")


def test_stop_frees_the_card_and_the_next_message_works(open_page, slow, screenshots):
    page, _ = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    send(page, "count to 400")
    expect(answer(page)).to_contain_text("1, 2, 3")
    expect(page.locator("#card-state")).to_have_text("The card is answering.")
    expect(page.locator("#card-detail")).to_have_text(re.compile(r"^About \d+ tokens so far, about [\d.]+ tokens/s\.$"))
    page.screenshot(path=screenshots / "answering.png")
    stop = page.get_by_role("button", name="Stop", exact=True)
    # With the keyboard alone: from the message box, Tab reaches Stop.
    message_box(page).press("Tab")
    expect(stop).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#card-state")).to_contain_text("Stopped")
    # The answer had hundreds of tokens to go (seconds of card time): the card is free long before that.
    wait_for(lambda: slow.metric("qwen_chat_card_busy") == 0, timeout=6, what="the card freed by Stop")
    expect(stop).to_be_hidden()
    expect(page.locator(".turn.assistant .note")).to_have_text("Stopped.")
    assert "400." not in answer(page).inner_text()
    send(page, "after the stop")
    expect(answer(page)).to_have_text(said("after the stop"))
    send(page, "count to 300")  # and Escape stops too
    expect(answer(page)).to_contain_text("1, 2, 3")
    page.keyboard.press("Escape")
    expect(page.locator("#card-state")).to_contain_text("Stopped")
    wait_for(lambda: slow.metric("qwen_chat_card_busy") == 0, timeout=6, what="the card freed by Escape")


def test_the_place_in_the_queue_while_another_client_holds_the_card(open_page, slow, screenshots):
    page, _ = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    holder, release = hold_card(slow)
    try:
        send(page, "my turn")
        expect(page.locator("#card-state")).to_have_text("Waiting in the queue for the card: you are next.")
        expect(page.locator("#card-detail")).to_contain_text(
            "Waiting: 1 message from people, 0 background tasks. Yours counts as a person's message.")
        page.screenshot(path=screenshots / "queue.png")
    finally:
        release.set()
        holder.join(60)
    expect(answer(page)).to_have_text(said("my turn"))


def test_the_prompt_progress_bar_moves_and_completes(open_page, slow, tokenizer, screenshots):
    slow.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "warm up"}]})
    page, _ = open_page(slow, color_scheme="light", viewport={"width": 1100, "height": 760})
    bars = record(page, """
        const bar = document.getElementById("prompt-progress");
        const detail = document.getElementById("card-detail");
        new MutationObserver(() => window.recorded.push({value: bar.value, max: bar.max, hidden: bar.hidden,
                                                         detail: detail.textContent}))
            .observe(document.getElementById("card"), {subtree: true, attributes: true, childList: true,
                                                       characterData: true});
    """)
    send(page, LONG)
    moving = page.locator("#prompt-progress")
    page.wait_for_function("() => { const b = document.getElementById('prompt-progress');"
                           " return !b.hidden && b.value > 0 && b.value < b.max; }")
    expect(page.locator("#card-state")).to_have_text("The card is reading your conversation.")
    page.screenshot(path=screenshots / "reading.png")
    expect(answer(page)).to_have_text(said(LONG))
    expect(moving).to_be_hidden()
    total = len(tokenizer.chat_ids([{"role": "user", "content": LONG}]))
    shown = [r for r in bars() if not r["hidden"] and r["max"] == total]
    values = [r["value"] for r in shown]
    assert values == sorted(values)
    assert len({v for v in values if 0 < v < total}) >= 2  # it moved while the card read
    assert values[-1] == total  # and completed before the first words
    assert any(re.search(rf"^\d+ of {total} tokens read, about [\d.]+ s left \(an estimate", r["detail"])
               for r in shown)
    expect(page.locator("#card-detail")).to_contain_text(f"Prompt: {total} tokens in")


def test_turns_left_out_to_fit_the_window_are_shown(open_page, server):
    page, _ = open_page(server)
    first = "The card reads slowly. " * 80  # about 400 tokens, and an answer as long
    send(page, first)
    expect(answer(page, 0)).to_contain_text("You said")
    page.locator(".turn.assistant .copy").first.wait_for()
    assert page.locator("#window-gauge").evaluate("meter => meter.value") == pytest.approx(820, abs=40)
    expect(page.locator("#window-full")).to_have_text("Nearly full: the oldest turns will be left out next.")
    send(page, "and now?")
    expect(answer(page, 1)).to_have_text(said("and now?"))
    expect(page.locator("#dropped")).to_have_text(
        "To fit the card's 1024-token window, the 2 oldest messages were left out: the model did not see them.")
    expect(page.locator(".turn.left-out")).to_have_count(2)


def test_an_api_key_is_asked_for_once_and_remembered(open_page, start_server):
    server = start_server(server={"api_key": "sesame"})
    page, watch = open_page(server)
    watch.expected_errors.append("401")  # the refused key: Chromium logs the response
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    key = dialog.get_by_label("Key")
    expect(key).to_have_attribute("type", "password")
    key.fill("wrong")
    key.press("Enter")
    expect(dialog.get_by_role("alert")).to_have_text("That key was not accepted. Check it and try again.")
    key.fill("sesame")
    dialog.get_by_role("button", name="Use this key").click()
    expect(dialog).to_be_hidden()
    headers = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and headers.append(r.headers))
    send(page, "hello with a key")
    expect(answer(page)).to_have_text(said("hello with a key"))
    assert headers[-1]["authorization"] == "Bearer sesame"

    page.reload()
    expect(page.locator("#model")).to_have_text("Qwen2.5-1.5B-Instruct")  # /v1/models answered: the key works
    expect(dialog).to_be_hidden()
    send(page, "still remembered")
    expect(answer(page)).to_have_text(said("still remembered"))

    # A key that stops working is asked for again, and the message goes once it is given.
    page.evaluate("() => localStorage.setItem('qwen-chat.api-key', 'revoked')")
    send(page, "after a change")
    expect(dialog.get_by_role("alert")).to_have_text("The service did not accept the key. Enter it again.")
    dialog.get_by_label("Key").fill("sesame")
    dialog.get_by_label("Key").press("Enter")
    expect(answer(page)).to_have_text(said("after a change"))

    # Asked for again at start, with a conversation kept: once the key is given, the gauge counts it.
    page.evaluate("() => localStorage.setItem('qwen-chat.api-key', 'revoked')")
    page.reload()
    expect(dialog).to_be_visible()
    expect(page.locator("#window-text")).to_have_text("0 of 1024 tokens")
    dialog.get_by_label("Key").fill("sesame")
    dialog.get_by_label("Key").press("Enter")
    expect(page.locator("#window-text")).to_have_text(re.compile(r"^[1-9]\d* of 1024 tokens$"))


def test_a_conversation_too_long_for_the_window_is_a_sentence(open_page, server, screenshots):
    page, watch = open_page(server, color_scheme="light", viewport={"width": 1100, "height": 760})
    watch.expected_errors.append("400")
    text = "word " * 1200
    send(page, text)
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("This is too long for the card's 1024-token window.")
    expect(alert).to_contain_text("maximum context length is 1024 tokens")
    assert_no_json(alert.inner_text())
    expect(message_box(page)).to_have_value(text.strip())  # back in the box, to shorten
    expect(page.locator(".turn.user")).to_have_class(re.compile("withdrawn"))
    page.screenshot(path=screenshots / "error.png")


def test_an_error_event_inside_the_stream_is_a_sentence(open_page, start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}}, server={"queue_timeout": 0.5},
                          generation={"max_tokens": 900})
    page, _ = open_page(server)
    holder, release = hold_card(server)
    try:
        send(page, "too late")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The card is busy with other people's requests.")
        expect(alert).to_contain_text("waited 0.5 s for the card")
        assert_no_json(alert.inner_text())
    finally:
        release.set()
        holder.join(60)


def test_an_unavailable_card_is_a_sentence(open_page, start_server):
    server = start_server(runner={"emulator": {"fault": "start_fail"}}, wait=False)
    wait_for(lambda: server.health()[1]["status"] == "unavailable", what="the card unavailable")
    page, watch = open_page(server)
    watch.expected_errors.append("503")
    expect(page.locator("#health")).to_contain_text("Card unavailable: ")
    send(page, "anyone there?")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The NPU card is unavailable.")
    assert_no_json(alert.inner_text())
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_without_the_libraries_answers_are_plain_text(open_page, server):
    page, watch = open_page(server, block="**/static/vendor/**")
    watch.expected_errors.append("net::ERR_FAILED")  # the blocked libraries
    send(page, "**not bold** <b>nor this</b>")
    expect(answer(page)).to_have_text(said("**not bold** <b>nor this</b>"))
    assert answer(page).locator("strong, b").count() == 0


def test_dark_mode_and_a_phone_screen(open_page, server, screenshots):
    page, _ = open_page(server, color_scheme="dark", viewport={"width": 1100, "height": 760})
    send(page, "Show me:\n```sh\ncurl -s localhost:8000/health\n```\nin the dark")
    expect(answer(page).locator("pre code")).to_have_text("curl -s localhost:8000/health")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    text = page.evaluate("() => getComputedStyle(document.body).color")
    assert luminance(background) < 0.2 and luminance(text) > 0.7
    page.screenshot(path=screenshots / "dark.png")

    phone, _ = open_page(server, color_scheme="light", viewport={"width": 390, "height": 780}, is_mobile=True,
                         has_touch=True, device_scale_factor=2)
    send(phone, "Hello from a phone, count to 12")
    expect(answer(phone)).to_have_text(answer_to("Hello from a phone, count to 12"))
    assert phone.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    for control in (message_box(phone), phone.get_by_role("button", name="Send"),
                    phone.get_by_role("button", name="New chat")):
        expect(control).to_be_in_viewport()
    phone.screenshot(path=screenshots / "phone.png")


def luminance(css_color):
    red, green, blue = (int(v) / 255 for v in re.findall(r"\d+", css_color)[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue
