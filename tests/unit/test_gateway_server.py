"""The gateway's uvicorn protocol: what one loop iteration writes reaches the socket in one write."""

from __future__ import annotations

import asyncio

from gateway.server import _CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_head_and_body_go_out_in_one_write():
    inner = RecordingTransport()
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
    assert inner.writes == []  # the head waits for its body
    transport.write(b"{}")
    assert inner.writes == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]  # at once, together
    await asyncio.sleep(0)  # the head's scheduled flush finds nothing left
    assert len(inner.writes) == 1
    assert transport.get_extra_info("peername") == "info:peername"  # everything else is the transport's


async def test_a_head_alone_goes_out_at_the_end_of_the_iteration():
    inner = RecordingTransport()
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]


async def test_a_streamed_chunk_waits_for_no_loop_iteration():
    inner = RecordingTransport()
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"1d\r\ndata: {...first token...}\n\n\r\n")
    assert inner.writes == [b"1d\r\ndata: {...first token...}\n\n\r\n"]


async def test_close_sends_what_is_pending_first():
    inner = RecordingTransport()
    transport = _CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    transport.close()
    assert inner.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"] and inner.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left and writes nothing after the close
    assert len(inner.writes) == 1
