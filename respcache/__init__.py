"""Response caches: exact (same request, same answer) and semantic (a paraphrase of a cached question),
looked up by the gateway before a job is queued and filled when a job succeeds. See docs/caching.md."""
