"""What every benchmark does around its run: the checks argparse cannot make alone (--min-X not above
--max-X, a --redis-url that answers: roles started on a Redis that is away wait for it without a word), and
the run's folder (its Redis, the roles' logs, its random model and batch file), removed when the run
succeeds (a served run's Redis data and random model add up, run after run) and kept and named when it fails, for its logs."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def launch(name: str, main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """main(args) after the checks, with `args.workdir` a fresh folder."""
    from tokenq.flag_checks import check_ranges

    quiet_library_logs()

    check_ranges(args)
    if getattr(args, "redis_url", None):
        from tokenq.redis_command import require_reachable

        require_reachable(args.redis_url)
    args.workdir = Path(tempfile.mkdtemp(prefix=f"tokenq-bench-{name}-"))
    try:
        code = main(args)
    except BaseException:
        _keep_if_it_holds_something(args.workdir)
        raise
    if code == 0:
        shutil.rmtree(args.workdir, ignore_errors=True)
    else:
        _keep_if_it_holds_something(args.workdir)
    return code


def quiet_library_logs() -> None:
    """The product's info lines (a cache loaded, an engine started) would break into the benchmark's own
    lines and table: in a benchmark's process only warnings and errors show. Roles it starts log as usual."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _keep_if_it_holds_something(workdir: Path) -> None:
    if any(workdir.iterdir()):
        print(f"the run's folder (logs, Redis) is kept: {workdir}", file=sys.stderr)
    else:  # a benchmark that starts no role
        workdir.rmdir()
