"""tokenq: the command line, settings, the `up` supervisor, the model store and the benchmarks."""
