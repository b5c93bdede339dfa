"""Prometheus counters of the webhook service."""

from __future__ import annotations

from prometheus_client import Counter, disable_created_metrics

# No `*_created` series beside each counter and histogram (as vLLM): they doubled the series and nothing reads them.
disable_created_metrics()

DELIVERIES = Counter(
    "tokenq_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retry, failed (gave up), disabled (410 Gone), "
    "skipped (endpoint disabled), refused (non-public address), gone (job record expired).",
    ["outcome"],
)
RELAYED = Counter("tokenq_webhook_relayed_total", "Outbox entries handed to the delivery queue.")
