"""The HTTP front door: OpenAI-compatible routes and jobs, validated here and queued on Redis streams."""
