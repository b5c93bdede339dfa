"""Prometheus series of the batch feeder (`tokenq batches`). Lines and batches are counted once over all
feeders: a line when its result is first recorded (results.RECORD says which are new), a batch when its
final status is written under its lease."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics

from jobstore import JobRef
from protocol.jobs import JobState

# No `*_created` series beside each counter (as vLLM): they doubled the series and nothing reads them.
disable_created_metrics()

LINES = Counter("tokenq_batch_lines_total", "Batch lines given their result: `output` (a response in the "
                "output file) or `error` (the error file: a refused or failed request, or one the batch's "
                "cancel or expiry stopped).", ["file"])
BATCHES_ENDED = Counter("tokenq_batches_ended_total", "Batches ended, by final status: completed, failed (its "
                        "input file was deleted), expired, cancelled.", ["status"])
JOBS_ENDED = Counter("tokenq_batch_jobs_ended_total", "Jobs of batch lines that the feeder moved to their final "
                     "state itself (a cancelled or expired batch's queued lines), which no worker or gateway "
                     "counts.", ["model", "reason"])
FEEDING = Gauge("tokenq_batches_feeding", "Batches this feeder holds the lease of and works.")

for _file in ("output", "error"):
    LINES.labels(_file)
for _status in ("completed", "failed", "expired", "cancelled"):
    BATCHES_ENDED.labels(_status)


def job_ended(ref: JobRef, state: JobState) -> None:
    """The job store's `on_ended`: one job the feeder's cancel ended."""
    JOBS_ENDED.labels(ref.model, state.value).inc()
