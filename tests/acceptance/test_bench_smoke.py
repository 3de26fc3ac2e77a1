"""``python -m bench --quick``: every benchmark script runs end to end on tiny sizes.

The figures themselves are not checked (timing goals belong to ``make bench``, not to
tests); what is checked is that each script starts what it measures, measures it, and
reports a row with a number for every figure it promises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(
    r"^\| (?P<name>[^|]+) \| (?P<value>[\d,.]+) (?P<unit>\S+) \|.*\| (?P<met>yes|NO|-) \|$"
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_runs_and_reports_its_figures(name: str) -> None:
    # One process per benchmark, so the suite's workers share them out.
    # SQLite only: a PostgreSQL row would need a database of its own beside the suite's.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TEST_POSTGRES_URL", "BENCH_POSTGRES_URL", "DATABASE_URL", "REDIS_URL"}
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"# bench.{name}:" in done.stderr, done.stderr[-4000:]
    rows = [match for line in done.stdout.splitlines() if (match := ROW.match(line))]
    names = [row["name"] for row in rows]
    assert rows, done.stdout
    assert len(set(names)) == len(names), names
    assert all(float(row["value"].replace(",", "")) >= 0 for row in rows), done.stdout
    # Rows without a target (a second baseline, for information) show "-" and are not counted.
    judged = [row for row in rows if row["met"] != "-"]
    if judged:
        assert re.search(rf"\d+ of {len(judged)} targets met\.", done.stdout), done.stdout
