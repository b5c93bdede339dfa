"""jobstore/pipe.py's writes: a command on an idle connection goes out at once; commands sent while replies
are awaited go out together at the end of the loop iteration."""

from __future__ import annotations

import asyncio

from jobstore.pipe import RespProtocol


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        pass


async def test_a_lone_command_is_written_at_once_and_the_busy_connection_groups():
    proto = RespProtocol()
    transport = RecordingTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    first = proto.send(b"*1\r\n$4\r\nPING\r\n")
    assert transport.writes == [b"*1\r\n$4\r\nPING\r\n"]  # no loop iteration waited for
    second = proto.send(b"A")
    third = proto.send(b"B")
    assert len(transport.writes) == 1  # a reply is awaited: these wait for the iteration's end
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"AB"]
    proto.data_received(b"+PONG\r\n+a\r\n+b\r\n")
    assert (first.result(), second.result(), third.result()) == ("PONG", "a", "b")
    proto.send(b"C")  # idle again
    assert transport.writes[2:] == [b"C"]
