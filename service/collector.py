"""The cyclic garbage collector, set for a process that holds a model and plans roots of 612k samples.

A full collection walks every object the collector tracks, and each big dict of a plan entry by entry;
Python runs one whenever the objects that survived since the last grew by a quarter. Left as they are, the
start-up objects (torch, the model, the app: ~200k) and a plan's tables of files and targets are walked
over and over: 3-5 us of CPU a sample at 612k, measured with the collector's callbacks.
"""

from __future__ import annotations

import gc
import threading

# Young objects between collections (Python's default: 700). Reference counting frees nearly all a plan
# makes; a cycle waits a little longer to be collected.
YOUNG_THRESHOLD = 10_000

_lock = threading.Lock()
_settled = False


def settle_start_up() -> None:
    """Once a process has started (modules imported, the model loaded): what it made so far is frozen out of
    every later collection (`gc.freeze`), and young objects are collected less often. Once per process: a
    later call would freeze what requests and jobs have made."""
    global _settled
    with _lock:
        if _settled:
            return
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
        _settled = True
