"""Lines of the output and error files, in OpenAI's format, and the one script that records a line's result:
HSETNX keyed by line index, so however often a line's outcome is seen (a feeder restarted, a job rerun
after its worker died) its first result is its only one, and the counts and the batch's token usage move
with it."""

from __future__ import annotations

import json
import uuid
from typing import Any

from jobstore.scripts import Script

OUTPUT, ERROR = "o", "e"  # the prefix of a stored result: which file its line goes to


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    return json.dumps({"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response,
                       "error": error}, ensure_ascii=False)


def succeeded(custom_id: str, job_id: str, body: dict[str, Any]) -> tuple[str, str]:
    return OUTPUT, _line(custom_id, {"status_code": 200, "request_id": job_id, "body": body}, None)


def refused(custom_id: str, job_id: str, status_code: int, error: dict[str, Any]) -> tuple[str, str]:
    """A request that ran or was checked and got an error answer (invalid body, engine failure)."""
    return ERROR, _line(custom_id, {"status_code": status_code, "request_id": job_id, "body": {"error": error}},
                        None)


def not_run(custom_id: str, code: str, message: str) -> tuple[str, str]:
    """A request the batch did not finish (expired, cancelled): no response, an error."""
    return ERROR, _line(custom_id, None, {"code": code, "message": message})


def usage_of(kind: str, line: str) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of an output file line's response body; zeros for an error line.
    The batch's usage is the sum over its output lines, copies of an identical line included, as each
    line's body reports them."""
    if kind != OUTPUT:
        return 0, 0, 0
    usage = (json.loads(line)["response"]["body"] or {}).get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage.get("prompt_tokens") or 0, cached, usage.get("completion_tokens") or 0


def with_custom_id(stored: str, custom_id: str) -> tuple[str, str]:
    """Another line's result as this line's (an identical deterministic request that ran once)."""
    kind, line = stored[0], json.loads(stored[1:])
    line["id"], line["custom_id"] = "batch_req_" + uuid.uuid4().hex, custom_id
    return kind, json.dumps(line, ensure_ascii=False)


# KEYS: 1 results hash, 2 batch hash, 3 in-flight hash, 4 copies hash.
# ARGV: sextuples of (line index, 'o' or 'e', the file line, prompt, cached and completion tokens). Returns
# how many were new, output lines and error lines.
RECORD = Script("""
local new = {0, 0}
for i = 1, #ARGV, 6 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1] .. ARGV[i + 2]) == 1 then
    local output = ARGV[i + 1] == 'o'
    new[output and 1 or 2] = new[output and 1 or 2] + 1
    redis.call('HINCRBY', KEYS[2], output and 'completed' or 'failed', 1)
    if output then
      redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[i + 3])
      redis.call('HINCRBY', KEYS[2], 'cached_tokens', ARGV[i + 4])
      redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[i + 5])
    end
  end
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return new
""")
