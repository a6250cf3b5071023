"""``@prefect_task(...)``: ``@prefect.task(...)`` built on first use, so importing the module costs no Prefect.

The steps a preview runs (extract, validate, segment, render) are plain functions with their Prefect task at
the end of the same module. ``smsflow campaign --dry-run`` and the extract's and render's worker processes
import those modules but never run a task; importing Prefect is 1.4-1.8 s of their start-up on these machines
(a 1,000-contact preview is ~3 s in all). A flow calling the task gets a real ``prefect.Task``, built from the
same function and options the first time it is called or looked at (``.submit``, ``.name``, ``.retries``...).
"""
from __future__ import annotations

import functools
from typing import Any, Callable


class LazyTask:
    """A function that becomes ``prefect.task(fn, **options)`` when first called or inspected."""

    def __init__(self, fn: Callable, options: dict[str, Any]):
        functools.update_wrapper(self, fn)  # __wrapped__, __name__, __doc__, __module__ of the function
        self._options = options
        self._task = None

    @property
    def task(self):
        """The Prefect task (built once; two threads racing build two equal ones, which is harmless)."""
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            self._task = task(self.__wrapped__, **{"cache_policy": NO_CACHE, **self._options})
        return self._task

    def __call__(self, *args, **kwargs):
        return self.task(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy and pickle look for dunders, and our own fields before __init__
            raise AttributeError(name)
        return getattr(self.task, name)


def prefect_task(**options) -> Callable[[Callable], LazyTask]:
    """``@prefect_task(name=..., retries=...)``: the options of ``prefect.task`` (``cache_policy`` NO_CACHE unless
    given: these steps write to the store, a cached result would skip the writes)."""
    return lambda fn: LazyTask(fn, options)
