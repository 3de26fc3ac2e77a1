"""Development-only tooling, used from the source checkout and never installed.

`run` is `make run`'s supervisor; `redis_server` starts the private Redis of `make run`,
the tests and the benchmarks. Neither is part of the runtime distribution or the image:
nothing in `throttler`, `api`, `relay` or `worker` may import this package.
"""
