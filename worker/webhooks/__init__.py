"""Webhook delivery: a relay moves finished jobs from the Redis outbox stream to arq delivery jobs, and
an arq worker POSTs each signed event (Standard Webhooks) to its checked address, with retries."""
