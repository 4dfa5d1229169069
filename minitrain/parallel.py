"""Elementwise work over both (all) cores: NumPy's ufuncs run on one core, and release the GIL
inside their loops, so slices of an array dealt to a few threads run side by side.

Every slice is computed by the same operations whatever thread runs it, and results come back in
slice order: the bits never depend on the number of threads or their timing.
"""

import concurrent.futures
import os

import numpy

from minitrain import backend

WORKERS = max(1, min(4, os.cpu_count() or 1))
_pool = None


def run(tasks, work):
    """work(worker, task) for every task, the tasks dealt round-robin to WORKERS threads (worker:
    0..WORKERS-1, for per-thread scratch buffers); the results in task order. On CuPy, or with
    one worker or task, in this thread."""
    global _pool
    if WORKERS == 1 or backend.xp is not numpy or len(tasks) < 2:
        return [work(0, t) for t in tasks]
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="minitrain")
    results = [None] * len(tasks)

    def deal(w):
        for i in range(w, len(tasks), WORKERS):
            results[i] = work(w, tasks[i])

    for f in [_pool.submit(deal, w) for w in range(WORKERS)]:
        f.result()
    return results


def slices(n, size):
    """[0, n) cut into slices of `size` elements (the last one shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
