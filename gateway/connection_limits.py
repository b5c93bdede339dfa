"""What one connection may hold of the gateway while its request arrives: a head (request line and headers)
of at most MAX_HEAD_BYTES, and the whole request within READ_TIMEOUT_S of the connection's start or of the
request's first byte (an upload to STREAMED_PATHS, up to hundreds of MiB, instead has READ_TIMEOUT_S between
two reads of its body). uvicorn's httptools protocol sets neither: it reads a header of any size into memory,
keeps a connection that never sends a byte open for good, and holds a request whose body comes a byte a second
as long as the client likes. Past a limit the client gets 431 or 408 (a connection that sent nothing is closed
without a word) and the connection closes, as nginx answers
(large_client_header_buffers, client_header_timeout, client_body_timeout). A request still arriving when the
gateway stops gets a 503 at once, not the whole shutdown grace. Every refusal here is OpenAI-style error JSON,
uvicorn's own 400 for a request it cannot parse included.

And while the answer goes out: a client that reads nothing of it for WRITE_TIMEOUT_S, once the socket's buffers
are full (the transport paused our writes), is cut off, as nginx's send_timeout does (a slow reader is not);
when the gateway stops, a client whose buffers are full is cut off at once. uvicorn waits on such a reader for good, holding the stream's
job and, at a stop, the whole shutdown grace. The app sees the client gone, as for any disconnect (a completion's
job is cancelled)."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.limits import STREAMED_PATHS
from gateway.stopping import STOPPING_MESSAGE
from protocol.errors import error_json

MAX_HEAD_BYTES = 64 * 1024
READ_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 60.0
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def refusal(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """A whole HTTP/1.1 response that closes its connection."""
    body = json.dumps(error_json(message, type_, None, code)).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))) + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above."""

    read_timeout_s = READ_TIMEOUT_S  # class attributes, so a test can shorten them
    write_timeout_s = WRITE_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # the next bytes are a request's head
        self._head_bytes = 0
        self._reading = True  # a request is arriving (or the connection's first may)
        self._upload = False  # the arriving request is an upload (its limit is between reads)
        self._events = 0  # heads and requests that ended on this connection
        self._deadline: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None  # while writes are paused: when the reader is cut off
        self._arm()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_reader(self.transport.get_write_buffer_size())

    def _watch_reader(self, unsent: int) -> None:
        """After each WRITE_TIMEOUT_S of paused writes, the reader is cut off unless it took some of what
        waits for it meanwhile: a slow reader is a reader."""
        def check() -> None:
            left = self.transport.get_write_buffer_size()
            if left < unsent:
                self._watch_reader(left)
            else:
                self._cut_off()

        self._stalled = self.loop.call_later(self.write_timeout_s, check)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch_reader()

    def _unwatch_reader(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _cut_off(self) -> None:
        """The reader took nothing for too long: the connection is dropped without waiting for its buffer
        (close would), and connection_lost tells the app the client is gone."""
        self._stalled = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        events_before = self._events
        super().data_received(data)
        if self._upload and self._reading and not self._in_head and not self.transport.is_closing():
            self._disarm()  # an upload's body: the limit runs from its last read
            self._arm()
        # Counted only for a read in which no head and no request ended, so all of it was head: a body's
        # last read (as large as the event loop reads), or a whole request in one read, is no head however large.
        if self._events == events_before and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request head (request line and headers) is over {MAX_HEAD_BYTES} bytes",
                             "request_header_fields_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading, self._head_bytes = True, 0
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._events += 1
        super().on_headers_complete()
        self._upload = self.scope.get("path") in STREAMED_PATHS

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._events += 1
        self._in_head, self._head_bytes, self._reading, self._upload = True, 0, False, False
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_reader()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is another protocol's from here
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:
        if self._reading and self._head_bytes == 0 and self._in_head:
            self.transport.close()  # idle between requests, or never sent one
        elif self._reading and not self._answered():
            self._refuse(503, STOPPING_MESSAGE, "server_shutting_down", "service_unavailable")
        elif self.flow.write_paused:  # a reader that takes nothing would hold the stop for its whole grace
            self._cut_off()
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as error JSON."""
        self._refuse(400, f"invalid HTTP request: {msg}", "invalid_http_request")

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._answered() or (self._in_head and self._head_bytes == 0):
            # Answered before its body was read (a 413): the rest is not waited for. Or nothing sent: a silent
            # close, since a client that pools connections would read a 408 there as its next request's answer.
            self.transport.close()
            return
        what = "sent nothing of its body for" if self._upload else "did not arrive whole within"
        self._refuse(408, f"the request {what} {self.read_timeout_s:g} s", "request_timeout")

    def _answered(self) -> bool:
        return self.cycle is not None and not self._in_head and self.cycle.response_started

    def _refuse(self, status: int, message: str, code: str, type_: str = "invalid_request_error") -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app, waiting for the body, sees the client gone
            self.cycle.message_event.set()
        self.transport.write(refusal(status, message, code, type_))
        self.transport.close()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
