"""Worker processes started at the very beginning of a command, warming up in the background.

A small preview (``smsflow campaign --dry-run`` on 1,000 contacts) spends most of its time importing:
Great Expectations alone takes 1-2.5 s (about half of that in the worker, where ``tasks.expectations``
defers what the checks never use), and it is needed only to check the extract. ``start()`` spawns the
worker that will run those checks right away and has it import and run a tiny check
while this process imports Prefect, reads the export and opens the store, so the two overlap on two
cores. ``smsflow.phones.PhoneClassifier`` then runs the extract checks in it (the phones' slow path keeps
its own pool, started only for big batches).

Only standard-library imports run in the command's process for this; the warm-up target is named
as ``"module:function"`` and imported in the worker.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
from concurrent.futures import Executor, ProcessPoolExecutor

from smsflow.processes import die_with

_pool: ProcessPoolExecutor | None = None


def _run(target: str) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)()


def start(target: str, workers: int = 2) -> None:
    """One spawn worker, started now running ``target``; no-op when it is running or the settings allow fewer
    than 2 processes (``workers``). Failing to start is not an error (the steps then run here)."""
    global _pool
    if _pool is not None or workers < 2:
        return
    try:
        # one worker: a second one would be spawned cold for the first job while this one warms up
        # killed when this process ends, however it ends (kill -9, os._exit)
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=die_with,
                                    initargs=(os.getpid(), signal.SIGKILL))
        _pool.submit(_run, target)
    except (OSError, RuntimeError):
        _pool = None


def pool() -> Executor | None:
    """The started pool, or None."""
    return _pool


def stop(kill: bool = False) -> None:
    """Shut the pool down; ``kill``: also kill its worker now (the command is about to ``os._exit``)."""
    global _pool
    if _pool is not None:
        pool, _pool = _pool, None
        if kill:
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.kill()
        # after a kill the wait is for the pool's thread to see it (~5 ms); the pool's queues are then freed with
        # it, which unlinks their named semaphores: left to os._exit, multiprocessing's resource tracker warned of
        # "leaked semaphore objects" at the end of every preview
        pool.shutdown(wait=kill, cancel_futures=True)
