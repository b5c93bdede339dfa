"""The continuous-batching engine: sequences, KV blocks, scheduler, model runner, sampler, detokenizer."""
