"""CORS as a browser enforces it: a page on another origin calls the service with the headers the official
openai JavaScript SDK sends (x-stainless-*), in headless Chromium, against real gunicorn."""
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import MODEL, said

# What openai-node sends with every request (src/client.ts, buildHeaders and getPlatformHeaders), in a browser.
SDK_HEADERS = {
    "Accept": "application/json", "Content-Type": "application/json", "Authorization": "Bearer browser-key",
    "X-Stainless-Lang": "js", "X-Stainless-Package-Version": "5.23.2", "X-Stainless-OS": "Linux",
    "X-Stainless-Arch": "x64", "X-Stainless-Runtime": "browser:chrome", "X-Stainless-Runtime-Version": "156.0.0",
    "X-Stainless-Retry-Count": "0", "X-Stainless-Timeout": "600",
}
FETCH = """async ([url, headers, body]) => {
    try {
        const response = await fetch(url, {method: "POST", headers, body: JSON.stringify(body)});
        return {status: response.status, body: await response.json(), id: response.headers.get("X-Request-Id")};
    } catch (error) {
        return {error: String(error)};
    }
}"""


@pytest.fixture
def other_origin(tmp_path):
    """A page served from another origin (another port): where the SDK runs."""
    (tmp_path / "index.html").write_text("<!doctype html><title>another app</title><p>another app</p>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_openai_js_sdks_headers_pass_a_browsers_cors_check(start_server, other_origin, browser):
    server = start_server(server={"cors_origins": [other_origin], "api_key": "browser-key"})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "from a browser"}]}
    page = browser.new_page()
    page.goto(other_origin + "/")
    allowed = page.evaluate(FETCH, [server.url + "/v1/chat/completions", SDK_HEADERS, body])
    assert allowed.get("status") == 200, allowed
    assert allowed["body"]["choices"][0]["message"]["content"] == said("from a browser")
    assert allowed["id"]  # an exposed header is readable from the page
    elsewhere = browser.new_page()  # a page whose origin is not configured
    elsewhere.goto("data:text/html,<p>elsewhere</p>")
    refused = elsewhere.evaluate(FETCH, [server.url + "/v1/chat/completions", SDK_HEADERS, body])
    assert "error" in refused and "Failed to fetch" in refused["error"]
