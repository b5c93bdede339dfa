"""The gateway's connection limits, against a real uvicorn server on the gateway's protocol: a head over the
limit is a 431, a request that does not arrive whole in time a 408, a request still arriving when the server
stops a 503 at once, an unparsable one error JSON; a slow answer or a kept-alive connection is not cut; a
client that leaves mid-body is counted a 499."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest
import uvicorn

from gateway import connection_limits
from gateway.server import HttpProtocol

pytestmark = pytest.mark.timeout(60)


async def _app(scope, receive, send):
    """Reads the whole body, then answers its length (after a pause when the path says /slow)."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            _app.disconnects += 1
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    if scope["path"] == "/endless":  # a stream without end, until the client is gone
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        gone = asyncio.create_task(receive())  # http.disconnect, once the connection is lost
        while not gone.done():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await asyncio.sleep(0)  # a send to a lost client returns at once
        _app.cut_off += 1
        return
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server(monkeypatch):
    monkeypatch.setattr(connection_limits.GuardedHttpProtocol, "read_timeout_s", 0.6)
    _app.disconnects = _app.cut_off = 0
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http=HttpProtocol, loop="asyncio", log_level="error", lifespan="off",
                            timeout_graceful_shutdown=5)
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.01)
    yield srv, sock.getsockname()[1]
    srv.should_exit = True
    await asyncio.wait_for(task, 10)


async def _exchange(port: int, *parts: bytes, pause: float = 0.0) -> tuple[int, dict | None, bytes]:
    """Sends the parts (pausing between them), reads until the server closes: (status, JSON body, raw)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(reader.read())
    for part in parts:
        if answer.done():  # the server answered and closed: no more to send
            break
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(pause)
    raw = await asyncio.wait_for(answer, 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if raw else 0
    try:
        return status, json.loads(body), raw
    except ValueError:
        return status, None, raw


async def test_a_head_over_the_limit_is_a_431_in_error_json(server):
    _, port = server
    big = b"x" * (connection_limits.MAX_HEAD_BYTES + 1)
    status, body, _ = await _exchange(port, b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ", big)
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large"
    assert str(connection_limits.MAX_HEAD_BYTES) in body["error"]["message"]


async def test_a_connection_that_sends_nothing_is_closed_without_a_word_and_a_half_head_with_a_408(server):
    """Nothing sent: no 408, which a client that pools connections would take for its next request's answer."""
    _, port = server
    start = time.monotonic()
    assert await _exchange(port) == (0, None, b"")
    assert time.monotonic() - start < 5
    status, body, _ = await _exchange(port, b"GET / HTTP/1.1\r\nhost: a\r\n")
    assert status == 408 and body["error"]["code"] == "request_timeout"


async def test_a_body_that_trickles_past_the_limit_is_a_408_and_the_app_sees_the_client_gone(server):
    _, port = server
    head = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n"
    status, body, _ = await _exchange(port, head, *([b"x"] * 20), pause=0.1)
    assert status == 408 and "did not arrive whole within 0.6 s" in body["error"]["message"]
    assert _app.disconnects == 1


async def test_a_slow_answer_and_a_kept_alive_connection_are_not_cut(server):
    """The limit is on the request's arrival, not on the answer: /slow answers after 1.5 s, over the 0.6 s."""
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for path in ("/slow", "/"):
        writer.write(b"POST %s HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc" % path.encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(await reader.readexactly(len(b"{\"size\": 3}"))) == {"size": 3}
        await asyncio.sleep(0.8)  # idle past the read limit, within uvicorn's 5 s keep-alive
    writer.close()


async def test_an_unparsable_request_is_a_400_in_error_json(server):
    _, port = server
    status, body, _ = await _exchange(port, b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "invalid_http_request"


async def test_a_request_still_arriving_when_the_server_stops_is_a_503_at_once(server):
    srv, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nabc")
    await writer.drain()
    await asyncio.sleep(0.1)
    start = time.monotonic()
    srv.should_exit = True
    raw = await asyncio.wait_for(reader.read(), 10)
    assert raw.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in raw
    assert time.monotonic() - start < 2  # not the 5 s grace
    writer.close()


async def test_an_upload_may_take_longer_than_the_limit_while_its_body_keeps_coming(server):
    """A batch file of hundreds of MiB takes more than the limit to send: for /v1/files the limit runs from
    the body's last read, so a steady upload is whole, one that stalls is a 408."""
    _, port = server
    head = b"POST /v1/files HTTP/1.1\r\nhost: a\r\ncontent-length: 12\r\n\r\n"
    start = time.monotonic()
    status, body, _ = await _exchange(port, head, *([b"x"] * 12), pause=0.1)  # 1.2 s in all, 0.1 s apart
    assert status == 200 and body == {"size": 12} and time.monotonic() - start > 0.6
    status, body, _ = await _exchange(port, head, b"x" * 6, pause=0.1)
    assert status == 408 and "sent nothing of its body for 0.6 s" in body["error"]["message"]


async def test_a_large_body_in_the_same_read_as_its_head_is_no_head_over_the_limit(server):
    """A whole request of 70 KB in one write (a `curl -F` upload of a 100 KB file, most times) was a 431: its
    body counted as head; and so, next, was a body whose last read was over the limit. So were pipelined requests in one write, and a later request on a kept-alive
    connection whose earlier one had come in one write."""
    _, port = server
    body = b"x" * 70_000
    request = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    status, answer, _ = await _exchange(port, request.replace(b"host: a", b"host: a\r\nconnection: close"))
    assert (status, answer) == (200, {"size": 70_000})
    head, body = request.replace(b"host: a", b"host: a\r\nconnection: close").split(b"\r\n\r\n", 1)
    status, answer, _ = await _exchange(port, head + b"\r\n\r\n", body, pause=0.2)  # the body's one last read
    assert (status, answer) == (200, {"size": 70_000})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    small = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 25000\r\n\r\n" + b"y" * 25_000
    writer.write(request + small * 3)  # four requests, pipelined in one write
    head = b"POST / HTTP/1.1\r\nhost: a\r\nx-pad: " + b"z" * 20_000
    for expected in (70_000, 25_000, 25_000, 25_000, 3):
        if expected == 3:  # then a 20 KB head sent in two pieces on the same connection
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"\r\ncontent-length: 3\r\n\r\nabc")
        answer_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer_head.startswith(b"HTTP/1.1 200"), answer_head
        length = int(next(line.split(b":")[1] for line in answer_head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        assert json.loads(await reader.readexactly(length)) == {"size": expected}
    writer.close()


async def test_the_fast_path_counts_a_client_that_left_mid_body_as_499():
    """As MetricsMiddleware counts an unanswered request whose app returned (and the access log logs it)."""
    from gateway.fastpath import FastSubmit
    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics(peers=None)
    submit = FastSubmit(fallback=None, ctx=None, metrics=metrics, max_body_bytes=1 << 20)
    messages = iter([{"type": "http.request", "body": b'{"model":', "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    await submit({"type": "http", "method": "POST", "path": "/v1/jobs", "headers": []}, receive, send)
    assert sent == []
    assert metrics.requests.labels("POST", "/v1/jobs", "499")._value.get() == 1


def _reader_that_never_reads(port: int, rcvbuf: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
    return sock


async def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return condition()


async def test_a_reader_that_takes_nothing_is_cut_off_after_the_write_timeout(server, monkeypatch):
    """uvicorn waited on it for good, and the stream's job ran on: the app now sees the client gone."""
    monkeypatch.setattr(connection_limits.GuardedHttpProtocol, "write_timeout_s", 0.5)
    _, port = server
    sock = _reader_that_never_reads(port)
    try:
        assert await _wait_for(lambda: _app.cut_off == 1, 10)
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):  # what reached this socket before the cut, then the end
                pass
    finally:
        sock.close()


async def test_a_reader_that_keeps_reading_is_not_cut_off(server, monkeypatch):
    """The timeout counts from the last write the socket took (nginx's send_timeout): a reader that takes
    less than the server writes keeps pausing the writes, and is no stalled reader."""
    monkeypatch.setattr(connection_limits.GuardedHttpProtocol, "write_timeout_s", 0.5)
    _, port = server
    sock = _reader_that_never_reads(port, rcvbuf=1 << 16)
    try:
        sock.setblocking(False)  # the server runs on this loop
        got, deadline = 0, time.monotonic() + 2.0  # four write timeouts, reading all along
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                got += len(sock.recv(1 << 16))
            await asyncio.sleep(0.005)
        assert got > 0 and _app.cut_off == 0
    finally:
        sock.close()


async def test_a_stop_cuts_off_a_reader_that_takes_nothing_at_once(server, monkeypatch):
    """It held the stop for uvicorn's whole grace, then its task was cancelled mid-send."""
    srv, port = server
    sock = _reader_that_never_reads(port)
    try:
        await asyncio.sleep(0.5)  # its buffers fill
        t0 = time.monotonic()
        srv.should_exit = True
        assert await _wait_for(lambda: _app.cut_off == 1, 10)
        assert time.monotonic() - t0 < 3.0  # the grace is 5 s
    finally:
        sock.close()
