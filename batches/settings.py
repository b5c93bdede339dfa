"""The Batch API's limits and knobs, read once from TOKENQ_* variables into one object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tokenq.settings import env_float, env_int

MB = 1 << 20


@dataclass(frozen=True)
class BatchSettings:
    max_lines: int = 50_000  # OpenAI's limit of requests per batch file
    max_file_bytes: int = 200 * MB  # OpenAI's limit of a batch file's size
    max_line_bytes: int = 4 * MB  # one request; a longer line cannot fit any context anyway
    file_retention_s: int = 30 * 86400  # files (input, output, error) expire after this
    batch_retention_s: int = 30 * 86400  # a final batch's record expires after this
    tenant_quota_bytes: int = 10 * 1024 * MB  # bytes of files one tenant may keep at once
    window: int = 512  # lines of one batch queued or running at once
    refill: int = 64  # fewest free window slots worth a refill (a refill is sorted by prompt as a group)
    poll_s: float = 0.2  # how often a feeder looks at its batches' jobs
    lease_s: float = 10.0  # a feeder that stops renewing this long loses its batches to another
    cancel_grace_s: float = 30.0  # how long a cancelled batch waits for its running lines to stop

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BatchSettings:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            max_lines=env_int(env, "TOKENQ_BATCH_MAX_LINES", d.max_lines),
            max_file_bytes=env_int(env, "TOKENQ_BATCH_MAX_FILE_BYTES", d.max_file_bytes),
            max_line_bytes=env_int(env, "TOKENQ_BATCH_MAX_LINE_BYTES", d.max_line_bytes),
            file_retention_s=env_int(env, "TOKENQ_FILES_RETENTION_S", d.file_retention_s),
            batch_retention_s=env_int(env, "TOKENQ_BATCH_RETENTION_S", d.batch_retention_s),
            tenant_quota_bytes=env_int(env, "TOKENQ_FILES_QUOTA_BYTES", d.tenant_quota_bytes),
            window=env_int(env, "TOKENQ_BATCH_WINDOW", d.window),
            refill=env_int(env, "TOKENQ_BATCH_REFILL", d.refill),
            poll_s=env_float(env, "TOKENQ_BATCH_POLL_S", d.poll_s),
            lease_s=env_float(env, "TOKENQ_BATCH_LEASE_S", d.lease_s),
            cancel_grace_s=env_float(env, "TOKENQ_BATCH_CANCEL_GRACE_S", d.cancel_grace_s),
        )
