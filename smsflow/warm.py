"""Worker processes started at the very beginning of a command, warming up in the background.

A small preview (``smsflow campaign --dry-run`` on 1,000 contacts) spends most of its time importing:
Great Expectations alone takes ~1.1 s, and it is needed only to check the extract. ``start()`` spawns the
worker that will run those checks (and parse phones) right away and has it import and run a tiny check
while this process imports Prefect, reads the export and opens the store, so the two overlap on two
cores. ``smsflow.phones.PhoneClassifier`` then uses this pool instead of starting its own.

Only this module's standard-library imports run in the command's process; the warm-up target is named
as ``"module:function"`` and imported in the worker.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
from concurrent.futures import Executor, ProcessPoolExecutor

_pool: ProcessPoolExecutor | None = None


def _run(target: str) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)()


def start(target: str, workers: int = 2, warm: int = 1) -> None:
    """A spawn pool of ``workers`` processes, ``warm`` of them started now running ``target``; no-op when one
    is running or fewer than 2 workers are allowed. Failing to start is not an error (the steps then use
    this process or their own pool)."""
    global _pool
    if _pool is not None or workers < 2:
        return
    try:
        _pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        for _ in range(max(0, min(warm, workers))):
            _pool.submit(_run, target)
    except (OSError, RuntimeError):
        _pool = None


def pool() -> Executor | None:
    """The started pool, or None."""
    return _pool


def stop() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
