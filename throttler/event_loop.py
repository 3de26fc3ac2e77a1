"""The event loop the relay and the worker run on: uvloop's where it is installed; and
how often their cyclic garbage collector runs.

uvloop runs the same asyncio code with less CPU for each callback, timer and socket
write. On the worker the event loop's own bookkeeping (handles, timers, transports) was
about a quarter of its CPU per job (py-spy during ``python -m bench --only end_to_end``);
the API already runs on it through uvicorn. Where uvloop is not installed (Windows, PyPy)
the standard loop runs the same code.

Python's collector runs its youngest generation every 700 net allocations of container
objects: a relay's claim of 1,000 rows (each row a handful of objects, from the driver's
tuple to the job's line) ran it dozens of times, and a tenth of those collections went
on to the older generations. At 10,000 the relay drains ~10 % faster (python -m bench.relay,
8,140 against 9,030 tasks/s here) for about 1 MB more at its peak: reference counting still
frees at once everything that is not in a cycle; only cyclic garbage waits longer.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# gc.set_threshold's three thresholds for the relay and the worker (see above).
GC_THRESHOLDS = (10_000, 10, 10)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (the standard loop) without it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of ``loop_factory``, collecting at GC_THRESHOLDS."""
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
