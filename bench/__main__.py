"""``python -m bench`` (``make bench``): run every benchmark and print one table.

Each benchmark module has ``run(*, quick: bool) -> list[Figure]``; it starts what it
measures (servers, Redis, databases) itself and measures its baseline in the same run,
since the machine is noisy. ``--quick`` runs tiny sizes once: the smoke test uses it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable

from bench.figures import Figure, render, summary

BENCHMARKS = (
    "intake",
    "relay",
    "worker",
    "latency",
    "throttle",
    "end_to_end",
    "cancel",
    "task_list",
    "limit_changes",
    "upstream",
    "cli_submit",
    "metrics_scrape",
    "dashboard_paint",
    "api_workers",
    "claim_scale",
)


def _runner(name: str) -> Callable[..., list[Figure]]:
    module = importlib.import_module(f"bench.{name}")
    run: Callable[..., list[Figure]] = module.run
    return run


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run each")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args(argv)
    figures: list[Figure] = []
    started = time.monotonic()
    for name in args.only or BENCHMARKS:
        began = time.monotonic()
        measured = _runner(name)(quick=args.quick)
        print(f"# bench.{name}: {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
        figures.extend(measured)
    print(f"Machine: {machine()}; {time.monotonic() - started:.0f} s in all.\n")
    print(render(figures))
    print(f"\n{summary(figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
