"""A stall probe for the server's worker processes, loaded by `bench/check.py --probe`.

Python imports `sitecustomize` at start-up from any directory on `PYTHONPATH`; the bench puts
this one there, with `KOOLBASE_BENCH_PROBE_DIR` naming where each process writes its log
(`stalls.<pid>.jsonl`). Nothing here is loaded by the server otherwise.

It logs, as one JSON object a line:
- every event-loop iteration whose callbacks ran longer than `BUSY_MS` between two selector
  waits, with the longest single callback in it. One long callback means that callback was
  slow or the process lost its core while running it; many short ones mean a large batch;
- every garbage collection longer than `GC_MS`, with its generation.

The cost is two clock reads a callback; a log line is written only for a stall.
"""

from __future__ import annotations

import asyncio.events
import gc
import json
import os
import selectors
import time
from typing import Any

BUSY_MS = 4.0
GC_MS = 2.0

_directory = os.environ.get("KOOLBASE_BENCH_PROBE_DIR")


def _install(directory: str) -> None:
    log = open(  # noqa: SIM115 - open for the life of the process, line-buffered
        os.path.join(directory, f"stalls.{os.getpid()}.jsonl"), "a", buffering=1
    )
    clock = time.perf_counter
    state: dict[str, Any] = {"left": None, "worst": 0.0, "what": ""}

    def write(**event: Any) -> None:
        event["at"] = round(time.time(), 4)
        log.write(json.dumps(event) + "\n")

    select = selectors.EpollSelector.select

    def probed_select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        entered = clock()
        left = state["left"]
        if left is not None and (entered - left) * 1000 > BUSY_MS:
            write(
                kind="busy",
                ms=round((entered - left) * 1000, 2),
                worst_ms=round(state["worst"] * 1000, 2),
                worst=state["what"],
            )
        state["worst"] = 0.0
        try:
            return select(self, timeout)
        finally:
            state["left"] = clock()

    run = asyncio.events.Handle._run

    def probed_run(self: asyncio.events.Handle) -> None:
        started = clock()
        try:
            run(self)
        finally:
            took = clock() - started
            if took > state["worst"]:
                state["worst"] = took
                state["what"] = repr(getattr(self, "_callback", None))[:100]

    collecting: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting["since"] = clock()
            return
        took = (clock() - collecting.pop("since", clock())) * 1000
        if took > GC_MS:
            write(kind="gc", ms=round(took, 2), generation=info["generation"])

    selectors.EpollSelector.select = probed_select  # type: ignore[method-assign]
    asyncio.events.Handle._run = probed_run  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)


if _directory:
    _install(_directory)
