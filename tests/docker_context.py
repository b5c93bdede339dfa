"""What `docker build` reads, without a daemon: the build context (the checkout minus what .dockerignore
excludes, by Docker's rules, which are not git's) and a Dockerfile's stages and instructions."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exception: bool  # a `!` line: it takes a path back in


def _glob_regex(pattern: str) -> str:
    """Go's filepath.Match plus Docker's `**` (any number of directories, zero included)."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1
            out += ".*" if i == len(pattern) else "(?:.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"unclosed [ in {pattern!r}")
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body).replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return out


def parse_dockerignore(text: str) -> list[IgnorePattern]:
    """One pattern a line: `#` in column one is a comment; each pattern is trimmed, cleaned of `.`, `..` and
    trailing slashes and anchored at the context's root (a leading `/` changes nothing)."""
    patterns = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        if not line:
            continue
        cleaned = posixpath.normpath(line).lstrip("/")
        patterns.append(IgnorePattern(re.compile(f"^{_glob_regex(cleaned)}$"), exception))
    return patterns


def is_excluded(path: str, patterns: list[IgnorePattern]) -> bool:
    """The last pattern that matches the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for p in patterns:
        if any(p.regex.match(prefix) for prefix in prefixes):
            excluded = not p.exception
    return excluded


def context_files(root: Path) -> dict[str, int]:
    """Every file Docker sends as the build context of `root` (relative POSIX path to size in bytes)."""
    ignore = root / ".dockerignore"
    patterns = parse_dockerignore(ignore.read_text()) if ignore.exists() else []
    # An excluded directory may hold a path an exception takes back: only then walk into it.
    prune = not any(p.exception for p in patterns)
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        if prune:
            dirnames[:] = [d for d in dirnames if not is_excluded(rel + d, patterns)]
        for name in filenames:
            path = rel + name
            if not is_excluded(path, patterns) and not os.path.islink(os.path.join(dirpath, name)):
                files[path] = os.path.getsize(os.path.join(dirpath, name))
    return files


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (continued) line, after COPY's and ADD's flags; variables not expanded
    flags: dict[str, str] = field(default_factory=dict)  # --from=build, --chown=... (COPY and ADD)
    words: list[str] = field(default_factory=list)  # the JSON array or the whitespace-split arguments

    def exec_form(self) -> list[str] | None:
        return json.loads(self.args) if self.args.startswith("[") else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Lines joined over trailing backslashes, with comment lines dropped (also inside a continuation)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages in order, FROM's image with the global ARGs' defaults expanded."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            words = _expand(args, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            continue
        if not stages:
            raise ValueError(f"{keyword} before the first FROM")
        flags, words = {}, []
        if keyword in ("COPY", "ADD"):
            while args.startswith("--"):
                flag, _, args = args[2:].partition(" ")
                name, _, value = flag.partition("=")
                flags[name] = value
                args = args.strip()
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
        stages[-1].instructions.append(Instruction(keyword, args, flags, words))
    return stages


def copy_from_context(stage: Stage, root: Path, files: dict[str, int], into: Path) -> list[str]:
    """Carry out the stage's COPY instructions that read the build context (not --from another stage)
    into the directory `into`, which stands for the image's /; the sources that match nothing."""
    missing = []
    workdir = "/"
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.args)
        if ins.keyword not in ("COPY", "ADD") or "from" in ins.flags:
            continue
        *sources, dest = ins.words
        dest_dir = dest.endswith("/") or len(sources) > 1
        dest = posixpath.join(workdir, dest)
        for source in sources:
            source = posixpath.normpath(source).lstrip("/")
            wanted = re.compile(f"^{_glob_regex(source)}(/.*)?$")
            matched = [path for path in files if wanted.match(path)]
            if not matched:
                missing.append(source)
            for path in matched:
                top = wanted.match(path)
                inside = top.group(1)  # the path below a matched directory, copied as the directory's contents
                name = inside.lstrip("/") if inside else posixpath.basename(path)
                target = posixpath.join(dest, name) if (inside or dest_dir) else dest
                out = into / target.lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes((root / path).read_bytes())
    return missing
