"""Where a request ends, judged from the bytes received so far (app/request_bytes.py), and that gunicorn's own
parser finds the same end."""
import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser
from hypothesis import given, settings
from hypothesis import strategies as st

from app.request_bytes import MAX_HEAD_BYTES, Arrived, RequestBytes

LIMIT = 1000


def post(body=b"", *headers, version="1.1", path="/v1/chat/completions"):
    head = [f"POST {path} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*pieces, trailers=b""):
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n" + trailers + b"\r\n"


def arrived(data, max_body=LIMIT):
    return RequestBytes(max_body, data).arrived


def byte_by_byte(data, max_body=LIMIT):
    """What has arrived after each byte."""
    request = RequestBytes(max_body)
    return [request.add(data[i:i + 1]) for i in range(len(data))]


REQUESTS = [
    post(b"", "Content-Length: 0"),
    b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n",
    b"\r\nGET /health HTTP/1.1\r\n\r\n",  # one empty line before the request line is allowed
    post(b'{"a": 1}', "Content-Length: 8"),
    post(b"x" * LIMIT, f"Content-Length: {LIMIT}"),
    post(chunked(b"hello", b" world"), "Transfer-Encoding: chunked"),
    post(chunked(b"hi", trailers=b"X-Checksum: 1\r\n"), "Transfer-Encoding: gzip, chunked"),
    post(b"", version="1.0"),
]


@pytest.mark.parametrize("request_bytes", REQUESTS)
def test_whole_exactly_when_the_last_byte_arrives(request_bytes):
    seen = byte_by_byte(request_bytes)
    assert seen[:-1] == [Arrived.NOT_YET] * (len(request_bytes) - 1) and seen[-1] is Arrived.WHOLE


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(REQUESTS), st.sampled_from(REQUESTS), st.lists(st.integers(1, 60), max_size=8))
def test_gunicorns_parser_ends_the_request_where_we_do(first, second, cuts):
    # The first request, then the start of a pipelined second one, in pieces of any size.
    data = first + second[:len(second) // 2]
    request, at = RequestBytes(LIMIT), 0
    for size in cuts + [len(data)]:
        request.add(data[at:at + size])
        at += size
    assert request.arrived is Arrived.WHOLE
    parser = RequestParser(Config(), [bytes(request.data)], ("127.0.0.1", 1))
    parsed = next(parser)
    parsed.body.read()
    assert parser.unreader.take_buffered() + b"".join(parser.unreader.iter or []) == second[:len(second) // 2]


def test_a_content_length_over_the_limit_needs_only_the_head():
    assert arrived(post(b"", f"Content-Length: {LIMIT + 1}")) is Arrived.HEAD


def test_a_chunked_body_over_the_limit_is_oversized():
    assert arrived(post(b"%x\r\n" % (LIMIT + 1), "Transfer-Encoding: chunked")) is Arrived.OVERSIZED_BODY
    assert arrived(post(chunked(b"x" * 600, b"x" * 600), "Transfer-Encoding: chunked")) is Arrived.OVERSIZED_BODY


@pytest.mark.parametrize("request_bytes", [
    post(b"", "Content-Length: 1", "Content-Length: 1"),
    post(b"", "Content-Length: -1"),
    post(b"", "Content-Length: 1, 1"),
    post(b"", "Content-Length: 1", "Transfer-Encoding: chunked"),
    post(b"", "Transfer-Encoding: gzip"),
    post(b"", "Transfer-Encoding: chunked", version="1.0"),
    post(b"zz\r\n", "Transfer-Encoding: chunked"),
    post(b"", "No colon here"),
    b"GET / HTTP/1.1\nHost: test\n\n",
])
def test_framing_it_cannot_read_is_handed_over_with_the_head(request_bytes):
    # gunicorn's parser answers these (400, 501) from the head alone.
    assert arrived(request_bytes) is Arrived.HEAD


def test_a_head_without_end_is_oversized():
    assert arrived(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * MAX_HEAD_BYTES) is Arrived.OVERSIZED_HEAD
    assert arrived(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES - 100)) is Arrived.NOT_YET


def test_expect_100_continue():
    expecting = RequestBytes(LIMIT, post(b"", "Content-Length: 5", "Expect: 100-Continue"))
    assert expecting.arrived is Arrived.NOT_YET and expecting.expects_continue
    # HTTP/1.0 clients do not wait for it.
    assert not RequestBytes(LIMIT, post(b"", "Content-Length: 5", "Expect: 100-continue", version="1.0")
                            ).expects_continue
    # A body over the limit is never asked for.
    over = RequestBytes(LIMIT, post(b"", f"Content-Length: {LIMIT + 1}", "Expect: 100-continue"))
    assert over.arrived is Arrived.HEAD and not over.expects_continue


def test_the_path_is_known_from_the_request_line():
    request = RequestBytes(LIMIT, b"POST /api/ch")
    assert request.path is None
    request.add(b"at?x=1 HTTP/1.1\r\nHost: te")
    assert request.path == "/api/chat" and request.arrived is Arrived.NOT_YET
    assert RequestBytes(LIMIT, b"\r\nGET /api/tags HTTP/1.1\r\n").path == "/api/tags"
