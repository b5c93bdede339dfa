"""`tokenq batch submit|wait|status|list|cancel|results`: the Batch API from a shell, over HTTP like any
client."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from tokenq.settings import DEFAULT_GATEWAY_URL, Settings, gateway_url

FINAL = ("completed", "failed", "expired", "cancelled")


def add_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="submit a JSONL file as a batch, follow, list or cancel batches, fetch "
                                         "their results")
    batch.add_argument("--url", default=None, help="the gateway (default $TOKENQ_URL, else the gateway of the "
                                                   "`tokenq up` running on TOKENQ_HOME, else "
                                                   f"{DEFAULT_GATEWAY_URL})")
    batch.add_argument("--api-key", default=None, help="default $TOKENQ_API_KEY, else $OPENAI_API_KEY")
    bsub = batch.add_subparsers(dest="batch_cmd", required=True)
    submit = bsub.add_parser("submit", help="upload FILE.jsonl and create a batch from it")
    submit.add_argument("file", type=Path)
    submit.add_argument("--endpoint", default=None, help="default: the url of the file's first line")
    submit.add_argument("--completion-window", default="24h")
    submit.add_argument("--wait", action="store_true", help="show progress until the batch ends, then "
                                                            "download its results")
    submit.add_argument("--output", "-o", type=Path, default=None, help="with --wait: where the output "
                        "file goes (default FILE.output.jsonl; errors beside it as FILE.errors.jsonl)")
    wait = bsub.add_parser("wait", help="show a batch's progress until it ends, then download its results")
    wait.add_argument("id")
    wait.add_argument("--output", "-o", type=Path, required=True)
    status = bsub.add_parser("status", help="print a batch as JSON")
    status.add_argument("id")
    listing = bsub.add_parser("list", help="the latest batches, newest first, one a line")
    listing.add_argument("--limit", type=int, default=20, help="how many (1-100; default 20)")
    cancel = bsub.add_parser("cancel", help="cancel a batch: lines not done end as batch_cancelled")
    cancel.add_argument("id")
    results = bsub.add_parser("results", help="download a batch's output (and error) file")
    results.add_argument("id")
    results.add_argument("--output", "-o", type=Path, required=True)
    results.add_argument("--errors", type=Path, default=None, help="default: OUTPUT with .errors.jsonl")
    batch.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    url = args.url or gateway_url(settings)
    api_key = args.api_key or settings.api_key
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            return _run(client, args)
    except httpx.TransportError as e:
        sys.exit(f"error: cannot reach the gateway at {url} ({e or type(e).__name__}); pass --url or set "
                 "TOKENQ_URL")


def _run(client: httpx.Client, args: argparse.Namespace) -> int:
    return {"submit": _submit, "wait": _wait_cmd, "status": _status, "list": _list, "cancel": _cancel,
            "results": _results}[args.batch_cmd](client, args)


def _wait_cmd(client: httpx.Client, args: argparse.Namespace) -> int:
    _check_writable("--output", args.output)
    return _wait(client, _get(client, f"/v1/batches/{args.id}"), args.output)


def _status(client: httpx.Client, args: argparse.Namespace) -> int:
    print(json.dumps(_get(client, f"/v1/batches/{args.id}"), indent=2))
    return 0


def _list(client: httpx.Client, args: argparse.Namespace) -> int:
    for batch in _get(client, f"/v1/batches?limit={args.limit}")["data"]:
        print(_line(batch))
    return 0


def _cancel(client: httpx.Client, args: argparse.Namespace) -> int:
    print(_line(_ok(client.post(f"/v1/batches/{args.id}/cancel"))))
    return 0


def _results(client: httpx.Client, args: argparse.Namespace) -> int:
    _check_writable("--output", args.output)
    if args.errors:
        _check_writable("--errors", args.errors)
    batch = _get(client, f"/v1/batches/{args.id}")
    if batch["status"] not in FINAL:
        sys.exit(f"error: batch {args.id} is {batch['status']}: its files are written when it ends; follow it "
                 f"with `tokenq batch wait {args.id} -o {args.output}`")
    _download(client, batch, args.output, args.errors or _beside(args.output, "errors"))
    return 0


def _line(batch: dict) -> str:
    """One batch as a line: id, status, lines done of total, when it was created."""
    counts = batch["request_counts"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created_at"]))
    return (f"{batch['id']}  {batch['status']:<11}  {counts['completed']} completed, {counts['failed']} failed "
            f"of {counts['total']}  {batch['endpoint']}  created {created}")


def _submit(client: httpx.Client, args: argparse.Namespace) -> int:
    if not args.file.is_file():
        sys.exit(f"error: {args.file}: no such file")
    output = args.output or args.file.with_suffix(".output.jsonl")
    if args.wait:
        _check_writable("--output", output)
    endpoint = args.endpoint or _first_url(args.file)
    with args.file.open("rb") as f:  # the gateway checks every line (and names a bad one) before the endpoint
        uploaded = _ok(client.post("/v1/files", data={"purpose": "batch"},
                                   files={"file": (args.file.name, f, "application/jsonl")}))
    if endpoint is None:
        sys.exit(f"error: {args.file}: the first line has no url; pass --endpoint")
    batch = _ok(client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint,
                                                  "completion_window": args.completion_window}))
    print(f"batch {batch['id']} ({batch['request_counts']['total'] or '?'} requests, file {uploaded['id']})",
          file=sys.stderr)
    if not args.wait:
        print(batch["id"])
        return 0
    code = _wait(client, batch, output)
    print(batch["id"])
    return code


def _wait(client: httpx.Client, batch: dict, output: Path) -> int:
    """Follow the batch to its end and download its files: 0 if it completed, 1 if not, 130 on Ctrl-C (the
    batch runs on; `tokenq batch wait ID` follows it again)."""
    try:
        batch = _follow(client, batch)
    except KeyboardInterrupt:
        print(f"\nbatch {batch['id']} runs on; follow it again with `tokenq batch wait {batch['id']} -o {output}`"
              f", or stop it with `tokenq batch cancel {batch['id']}`", file=sys.stderr)
        return 130
    _download(client, batch, output, _beside(output, "errors"))
    return 0 if batch["status"] == "completed" else 1


def _follow(client: httpx.Client, batch: dict, poll_s: float = 1.0) -> dict:
    """Poll until the batch ends, with a progress bar of lines done and failed, lines/s and ETA."""
    from tqdm import tqdm

    bar = tqdm(total=batch["request_counts"]["total"] or None, unit="line", desc=batch["status"])
    try:
        while True:
            counts = batch["request_counts"]
            bar.total = counts["total"]
            bar.set_description(batch["status"])
            bar.set_postfix(failed=str(counts["failed"]))  # tqdm writes 50000 as 5e+4
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            if batch["status"] in FINAL:
                break
            time.sleep(poll_s)
            batch = _get(client, f"/v1/batches/{batch['id']}")
    finally:
        bar.close()
    counts = batch["request_counts"]
    print(f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed "
          f"of {counts['total']}", file=sys.stderr)
    for error in (batch.get("errors") or {}).get("data") or []:
        print(f"  {error.get('code')}: {error.get('message')}", file=sys.stderr)
    return batch


def _download(client: httpx.Client, batch: dict, output: Path, errors: Path) -> None:
    """The batch's output and error files; a path whose file the batch does not have is removed, so that
    no file of an earlier batch stands in for this one's."""
    for file_id, path in ((batch.get("output_file_id"), output), (batch.get("error_file_id"), errors)):
        if not file_id:
            if path.is_file():
                path.unlink()
                print(f"{path}  (removed: batch {batch['id']} has no such file)", file=sys.stderr)
            continue
        # Into a file beside `path`, renamed over it once whole: a download that fails leaves what was there.
        part = path.with_name(f".{path.name}.part")
        try:
            with client.stream("GET", f"/v1/files/{file_id}/content") as r:
                if r.status_code != 200:
                    r.read()
                    _ok(r)
                with part.open("wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
            part.replace(path)
        finally:
            part.unlink(missing_ok=True)
        print(f"{path}  ({file_id})", file=sys.stderr)


def _check_writable(flag: str, path: Path) -> None:
    """Stops the command before it submits or fetches anything if the file cannot be written: not after a
    batch of hours has run."""
    if path.is_dir():
        sys.exit(f"error: {flag} {path} is a directory: name a file in it")
    if not path.parent.is_dir():
        sys.exit(f"error: {flag} {path}: there is no directory {path.parent}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        sys.exit(f"error: {flag} {path}: not writable")


def _first_url(path: Path) -> str | None:
    """The url of the file's first line; None if it has none (the upload then says what is wrong with it)."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw)["url"]
                except (ValueError, KeyError, TypeError):
                    return None
                return url if isinstance(url, str) else None
    return None


def _beside(path: Path, kind: str) -> Path:
    name = path.name.removesuffix(".jsonl").removesuffix(".output")
    return path.with_name(f"{name}.{kind}.jsonl")


def _get(client: httpx.Client, url: str) -> dict:
    return _ok(client.get(url))


def _ok(r: httpx.Response) -> dict:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        sys.exit(f"error: {r.request.method} {r.request.url.path}: {r.status_code}: {message}")
    return r.json()
