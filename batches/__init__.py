"""OpenAI's Batch API on tokenq's queue: files in Redis, batches fed line by line into the batch lane."""
