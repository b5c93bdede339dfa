"""What a streaming HTTP client costs on its own: lone streamed POSTs to a server that answers at once
(tokenq.bench.null_server under uvicorn, uvloop and httptools), the time to the first data chunk, median of
100 requests 20 ms apart, for httpx, aiohttp (`bench serve`'s client) and a bare socket.

    python tests/gpu/explore_client_floor.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import aiohttp
import httpx

from tokenq.embedded_redis import free_port, wait_for_port

BODY = {"model": "null", "prompt": list(range(128)), "max_tokens": 1, "stream": True}
PAUSE_S = 0.02


async def with_httpx(url: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=None) as client:
        for _ in range(n):
            await asyncio.sleep(PAUSE_S)
            t = time.perf_counter()
            async with client.stream("POST", url, json=BODY) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        out.append(time.perf_counter() - t)
    return out


async def with_aiohttp(url: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            await asyncio.sleep(PAUSE_S)
            t = time.perf_counter()
            async with session.post(url, json=BODY) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        out.append(time.perf_counter() - t)
    return out


async def with_socket(port: int, n: int) -> list[float]:
    """HTTP/1.1 by hand on one kept connection: the floor under any client."""
    out = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(BODY).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n").encode()
    for _ in range(n):
        await asyncio.sleep(PAUSE_S)
        t = time.perf_counter()
        writer.write(head + payload)
        buf = b""
        while b"data: {" not in buf:
            buf += await reader.read(65536)
        out.append(time.perf_counter() - t)
        while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's end
            buf += await reader.read(65536)
    writer.close()
    return out


def main() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "tokenq.bench.null_server:app", "--port", str(port),
                               "--loop", "uvloop", "--http", "httptools", "--log-level", "error"])
    try:
        wait_for_port(port, 60)
        url = f"http://127.0.0.1:{port}/v1/completions"
        for _ in range(2):
            for name, run in (("httpx", lambda: with_httpx(url, 100)), ("socket", lambda: with_socket(port, 100)),
                              ("aiohttp", lambda: with_aiohttp(url, 100))):
                print(f"{name} {statistics.median(asyncio.run(run())) * 1e3:.3f} ms")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
