"""Checks of flag values that would otherwise fail late: as argparse types and choices (one error line at
parse time, exit 2), or before a command starts anything (so no role under `tokenq up` fails again and again,
and no worker fails only after loading its model)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator

MAX_PORT = 65535


class OptionError(ValueError):
    """A flag whose value cannot work, said with the flag's name: `tokenq` prints it as one error line."""


def port(text: str) -> int:
    """argparse type of a port a server listens on."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: it must be a whole number from 1 to {MAX_PORT}")
    return value


class _ModelShapes:
    """The named shapes of random-weight models (SHAPES of worker/models/random_weights.py) as argparse
    choices, read only when a value is checked or listed: that module imports torch, which `tokenq --help`
    does without. Pass a metavar with it, or argparse lists the choices while it builds the parser."""

    @staticmethod
    def _names() -> list[str]:
        from worker.models.random_weights import SHAPES

        return list(SHAPES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


MODEL_SHAPES = _ModelShapes()


def check_host(host: str) -> None:
    """A host name that resolves, so the servers that listen on it can start."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise OptionError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None


def listen_error(host: str, port: int) -> str | None:
    """Why a server could not listen on `host:port` now (in use, not ours), or None when it could."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed one's port is free
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def check_port_free(flag: str, port: int | None, host: str = "0.0.0.0") -> None:
    """Nothing listens on `port` yet (Prometheus' exporter listens on every address, as `host` says)."""
    if port is not None and (why := listen_error(host, port)) is not None:
        raise OptionError(f"{flag} {port}: cannot listen on it ({why}); choose another port")


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked in a child process unless torch is loaded here already: a worker's
    own process keeps to Redis and imports no torch."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    probe = subprocess.run([sys.executable, "-c", "import torch; raise SystemExit(not torch.cuda.is_available())"],
                           capture_output=True)
    return probe.returncode == 0
