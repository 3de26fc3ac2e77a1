"""The event loop the relay and the worker run on: uvloop's where it is installed.

uvloop runs the same asyncio code with less CPU for each callback, timer and socket
write. On the worker the event loop's own bookkeeping (handles, timers, transports) was
about a quarter of its CPU per job (py-spy during ``python -m bench --only end_to_end``);
the API already runs on it through uvicorn. Where uvloop is not installed (Windows, PyPy)
the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (the standard loop) without it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of ``loop_factory``."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
