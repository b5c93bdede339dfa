"""Checks of flag values that would otherwise fail late: as argparse types and choices (one error line at
parse time, exit 2), or before a command starts anything (so no role under `tokenq up` fails again and again,
and no worker fails only after loading its model)."""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_PORT = 65535
# The exit status of a command whose flags or settings cannot work, as argparse's: `tokenq up` does not start
# again a role that exits so (no restart cures a setting).
EXIT_SETTINGS = 2


class OptionError(ValueError):
    """A flag whose value cannot work, said with the flag's name: `tokenq` prints it as one error line and
    exits with EXIT_SETTINGS."""


def port(text: str) -> int:
    """argparse type of a port a server listens on."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: it must be a whole number from 1 to {MAX_PORT}")
    return value


def whole_number(at_least: int = 0) -> Callable[[str], int]:
    """argparse type of an int of at least `at_least` (a count, a length, a seed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = at_least - 1
        if value < at_least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {at_least}")
        return value

    return parse


def whole_numbers(at_least: int = 1) -> Callable[[str], str]:
    """argparse type of a comma-separated list of whole numbers of at least `at_least` ("1,32,64"); the value
    stays that text, with spaces dropped, for the code that splits it."""
    one = whole_number(at_least)

    def parse(text: str) -> str:
        try:
            return ",".join(str(one(part.strip())) for part in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers of at "
                                             f"least {at_least}") from None

    return parse


def names(choices: tuple[str, ...]) -> Callable[[str], str]:
    """argparse type of a comma-separated list of some of `choices` ("hand-written,library"); the value stays
    that text, with spaces dropped, for the code that splits it."""
    def parse(text: str) -> str:
        parts = [part.strip() for part in text.split(",")]
        if not all(part in choices for part in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: it must be one or more of {', '.join(choices)}, "
                                             "comma-separated")
        return ",".join(parts)

    return parse


def number(*, above: float | None = None, at_least: float | None = None, at_most: float | None = None,
           inf: bool = False) -> Callable[[str], float]:
    """argparse type of a float in a range (`inf` lets "inf" through too)."""
    bounds = [f"above {above:g}" if above is not None else "", f"at least {at_least:g}" if at_least is not None
              else "", f"at most {at_most:g}" if at_most is not None else "", "or inf" if inf else ""]
    what = (f"from {at_least:g} to {at_most:g}" if at_least is not None and at_most is not None and above is None
            else " ".join(b for b in bounds if b))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = not math.isnan(value) and (inf and value == math.inf or not math.isinf(value)
                                        and (above is None or value > above)
                                        and (at_least is None or value >= at_least)
                                        and (at_most is None or value <= at_most))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {what}")
        return value

    return parse


count = whole_number(at_least=1)  # requests, tokens, processes
natural = whole_number(at_least=0)  # a seed, a count where 0 skips the part
fraction = number(at_least=0, at_most=1)  # a share, 0 to 1
positive_number = number(above=0)


def output_file(text: str) -> str:
    """argparse type of a file a command writes at its end (a benchmark's --out): its folder must exist and
    be writable now, not when the run is over. argparse applies it to a default that is text too."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: it must be a file to write")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no folder {str(folder)!r} to write it in")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r}: not writable here (permission denied)")
    return text


def existing_file(what: str) -> Callable[[str], str]:
    """argparse type of a file a command reads; `what` tells what to pass instead, in the error line."""
    def parse(text: str) -> str:
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"no such file {text!r} ({what})")
        return text

    return parse


def bench_device(text: str) -> str:
    """argparse type of a benchmark's --device: auto (cuda when present), cpu, cuda or cuda:N."""
    index = text.removeprefix("cuda:")
    if text not in ("auto", "cpu", "cuda") and not (index != text and index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: it must be auto, cpu, cuda or cuda:N")
    return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Each flag's default in its help, where the help does not say it already (and the default says
    something: not None, not a store_true flag's False)."""
    for action in parser._actions:
        if (not action.option_strings or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
                or "default" in (action.help or "")):
            continue
        default = ",".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        action.help = f"{action.help} (default {default})" if action.help else f"default {default}"


def check_ranges(args: argparse.Namespace) -> None:
    """Each pair of flags --min-X and --max-X that both have a value: the least not above the most."""
    for name, low in vars(args).items():
        if not name.startswith("min_") or low is None:
            continue
        high = getattr(args, "max_" + name.removeprefix("min_"), None)
        if high is not None and low > high:
            flag = name.removeprefix("min_").replace("_", "-")
            raise OptionError(f"--min-{flag} {low} is above --max-{flag} {high}")


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


def require_cuda_if_asked(device: str) -> None:
    """A --device of cuda (or cuda:N) that this machine's torch cannot reach stops the command, in one line."""
    if device.startswith("cuda") and not cuda_available():
        raise OptionError(f"--device {device}: torch.cuda.is_available() is False here (no CUDA device, or a torch "
                          "built without CUDA); use --device cpu")


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked in a child process unless torch is loaded here already: a worker's
    own process keeps to Redis and imports no torch."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    probe = subprocess.run([sys.executable, "-c", "import torch; raise SystemExit(not torch.cuda.is_available())"],
                           capture_output=True)
    return probe.returncode == 0
