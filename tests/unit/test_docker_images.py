"""The images as far as they can be built without a Docker daemon or base images: each Dockerfile parses,
its COPY sources are in the build context that .dockerignore leaves (Docker's matching rules), that
context carries no virtual environment, wheels, caches or models and stays small, and the CPU image's
install step works from what its COPYs put in the image: the project builds into a wheel with every
package, installs into a fresh environment, and each image's command answers --help there. Neither base
image is pulled and nothing is downloaded: docs/deploy.md says what stays unchecked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.docker_context import (
    context_files,
    copy_from_context,
    is_excluded,
    parse_dockerfile,
    parse_dockerignore,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
CONTEXT_LIMIT = 8 << 20  # bytes; the sources are under 4 MB, and a stray venv or model is gigabytes
# What a working checkout holds besides the sources (.gitignore's entries, a model store, a pulled model).
JUNK = [".git/HEAD", ".venv/lib/python3.12/site-packages/torch/__init__.py", ".whl/torch-2.13.0-cp312.whl",
        "tokenq.egg-info/PKG-INFO", "build/lib/tokenq/cli.py", "dist/tokenq-0.1.0.tar.gz",
        "worker/__pycache__/service.cpython-312.pyc", "worker/engine/__pycache__/runner.cpython-312.pyc",
        ".pytest_cache/v/cache/nodeids", ".ruff_cache/CACHEDIR.TAG", ".tokenq/models/m/model.safetensors",
        "bench-engine.json", "out/serve.png", "gateway/stray.whl", "models/llama/model.safetensors"]
FORBIDDEN = re.compile(r"(^|/)(\.git|\.venv|\.whl|__pycache__|\.pytest_cache|\.ruff_cache|\.tokenq)(/|$)"
                       r"|\.(whl|pyc|safetensors|gguf|pt)$|\.egg-info(/|$)")


def stages(dockerfile: str):
    return parse_dockerfile((ROOT / dockerfile).read_text())


def project_packages() -> set[str]:
    """The top-level packages pyproject.toml's find includes, as directories of the checkout."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    roots = {pattern.rstrip("*") for pattern in find["include"]}
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name in roots}
    assert found == roots, f"pyproject includes packages the checkout lacks: {roots - found}"
    return found


def test_the_matcher_follows_dockers_rules_not_gits():
    patterns = parse_dockerignore("# comment\n*.whl\n/build/\n**/__pycache__\ndocs\n!docs/keep.md\n ./out \n")
    assert is_excluded("x.whl", patterns) and not is_excluded("gateway/x.whl", patterns)  # anchored at the root
    assert is_excluded("build/lib/a.py", patterns) and not is_excluded("worker/build/a.py", patterns)
    assert is_excluded("__pycache__/a.pyc", patterns) and is_excluded("a/b/__pycache__/c.pyc", patterns)
    assert is_excluded("docs/deploy.md", patterns) and not is_excluded("docs/keep.md", patterns)  # last one wins
    assert is_excluded("out/a.png", patterns) and not is_excluded("outside.py", patterns)
    assert not is_excluded("# comment", patterns)
    assert is_excluded("a/b/c.txt", parse_dockerignore("a/**")) and is_excluded("x/y.go", parse_dockerignore("**/*.go"))
    assert is_excluded("a1", parse_dockerignore("a[0-9]")) and not is_excluded("ab", parse_dockerignore("a[0-9]"))


def test_dockerignore_leaves_out_what_a_working_checkout_holds(tmp_path):
    (tmp_path / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    for path in [*JUNK, "worker/service.py", "pyproject.toml"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    sent = set(context_files(tmp_path))
    assert sent == {".dockerignore", "worker/service.py", "pyproject.toml"}, sorted(sent)


@pytest.fixture(scope="module")
def context() -> dict[str, int]:
    return context_files(ROOT)


def test_the_build_context_is_small_and_clean(context):
    size = sum(context.values())
    print(f"build context: {len(context)} files, {size / 1e6:.2f} MB")  # shown with -s
    assert not [p for p in context if FORBIDDEN.search(p)]
    assert size < CONTEXT_LIMIT, f"{size / 1e6:.1f} MB in {len(context)} files"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copy_source_is_in_the_context_and_every_package_is_copied(dockerfile, context, tmp_path):
    parsed = stages(dockerfile)
    names = {s.name for s in parsed if s.name}
    for stage in parsed:
        for ins in stage.instructions:
            if ins.keyword in ("COPY", "ADD") and "from" in ins.flags:
                assert ins.flags["from"] in names, f"{dockerfile}: COPY --from an unknown stage {ins.flags['from']}"
    build = parsed[0]
    assert copy_from_context(build, ROOT, context, tmp_path) == [], f"{dockerfile}: COPY of what the context lacks"
    copied = {p.name for p in (tmp_path / "src").iterdir() if (p / "__init__.py").exists()}
    assert copied == project_packages(), f"{dockerfile} leaves out {project_packages() - copied}"
    runtime = parsed[-1]
    assert len(parsed) == 2, f"{dockerfile}: a build stage and a runtime stage that copies only the venv"
    assert [i.args for i in runtime.instructions if i.keyword == "USER"][-1:] == ["10001"], f"{dockerfile}: user"
    assert [i for i in runtime.instructions if i.keyword == "CMD"], f"{dockerfile}: no CMD"


def test_the_cuda_image_builds_on_a_runtime_base_with_the_gpu_extra():
    parsed = stages("Dockerfile.cuda")
    assert all("-runtime-" in s.base for s in parsed), "a CUDA runtime base, not devel"
    assert {"worker", "gpu"} <= set(install_target(parsed[0])[1].split(","))


def install_target(stage) -> tuple[str, str]:
    """(path, extras) of the build stage's `pip install "./src[extras]"`."""
    for ins in stage.instructions:
        m = re.search(r"pip install \"?(\./src)\[([\w,]+)\]\"?", ins.args) if ins.keyword == "RUN" else None
        if m:
            return m.group(1), m.group(2)
    raise AssertionError("no pip install of the project in the build stage")


def test_the_cpu_image_installs_and_its_command_runs(context, tmp_path):
    """The install step from exactly what the COPYs put in the image: a wheel (pip builds one for
    `pip install ./src[...]`), installed without dependencies into a fresh venv that borrows this venv's
    third-party packages (a .pth after its own site-packages), then the image's CMD with --help."""
    build, runtime = stages("Dockerfile")[0], stages("Dockerfile")[-1]
    image = tmp_path / "image"
    assert copy_from_context(build, ROOT, context, image) == []
    path, extras = install_target(build)
    src = image / path.lstrip("./")
    assert {"worker", "cache"} <= set(extras.split(","))
    # PYTHONPATH (this checkout) would show pip and Python the sources instead of what was installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TOKENQ_HOME": str(tmp_path / "home")}

    def run(*argv: object) -> str:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, f"{argv}: {done.stderr[-3000:]}"
        return done.stdout

    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src)
    wheel = next(wheels.glob("tokenq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if n.endswith("/__init__.py")} == project_packages()
    assert "respcache/verifier.onnx" in names  # package data

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(*pip, "--python", venv / "bin/python", "install", "--no-deps", "--no-index", wheel)
    purelib = run(venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    Path(purelib, "zz-borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    packages = sorted(project_packages())
    where = run(venv / "bin/python", "-c", f"import {', '.join(packages)}; "
                f"print(*[m.__file__ for m in ({', '.join(packages)})])").split()
    assert all(w.startswith(purelib) for w in where), f"the packages came from elsewhere: {where}"
    # The CUDA image installs the same project (with other extras): its CMD must run in it too.
    for stage in (runtime, stages("Dockerfile.cuda")[-1]):
        cmd = next(i for i in stage.instructions if i.keyword == "CMD").exec_form()
        assert cmd and cmd[0] == "tokenq"
        assert run(venv / "bin" / cmd[0], *cmd[1:], "--help").startswith(f"usage: tokenq {cmd[1]}")
