"""Headless Chromium (Debian's `chromium` package; scripts/test installs it) driven by playwright, and a watch
on every page: what it logged as errors, what it threw, and every request it made (none may leave the
machine)."""
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"
# Playwright's own browser download cannot work here (and need not): Debian's build, with nothing that
# phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(playwright):
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium package")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def origin(url):
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class PageWatch:
    """Everything a page did that a test may want to hold against it. `expected_errors`: substrings of console
    errors the test provokes on purpose (a refused key is a 401 that Chromium logs)."""

    def __init__(self, page):
        self.console_errors = []
        self.page_errors = []
        self.requests = []
        self.expected_errors = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))

    def foreign_requests(self, allowed_origin):
        return [url for url in self.requests if origin(url) != allowed_origin]

    def unexpected_errors(self):
        return self.page_errors + [text for text in self.console_errors
                                   if not any(expected in text for expected in self.expected_errors)]
