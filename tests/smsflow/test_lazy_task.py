"""smsflow.lazy_task: the steps' Prefect tasks are real Prefect tasks once used, and cost no import before."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smsflow.lazy_task import LazyTask, prefect_task

STEP_MODULES = ("tasks.extract", "tasks.validate", "tasks.segment", "tasks.render", "tasks.dry_run")


def test_importing_the_previewed_steps_does_not_import_prefect():
    code = ("import importlib, json, sys\n"
            f"for m in {STEP_MODULES!r}: importlib.import_module(m)\n"
            "import smsflow.exports\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_the_steps_tasks_are_prefect_tasks_with_their_options():
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    from tasks.extract import extract_task
    from tasks.render import plan_task
    from tasks.retrying import retry_if_transient
    from tasks.segment import segment_task
    from tasks.validate import validate_task

    expected = {extract_task: ("extract-crm-batches", 2), validate_task: ("validate-and-dedup-contacts", 1),
                segment_task: ("build-segment", 1), plan_task: ("render-into-outbox", 1)}
    for lazy, (name, retries) in expected.items():
        assert isinstance(lazy, LazyTask) and isinstance(lazy.task, Task)
        assert lazy.task is lazy.task  # built once
        assert (lazy.name, lazy.retries) == (name, retries)
        assert lazy.cache_policy is NO_CACHE and lazy.retry_condition_fn is retry_if_transient
        assert lazy.task.fn is lazy.__wrapped__  # the module's own function
    assert extract_task.retry_delay_seconds == [5, 30]
    assert extract_task.__name__ == "extract_task" and "CRM batches" in extract_task.__doc__


def _double(x: int) -> int:
    return 2 * x


@pytest.mark.usefixtures("prefect")
def test_a_lazy_task_called_in_a_flow_is_a_task_run():
    from prefect import flow
    from prefect.client.orchestration import get_client

    lazy = prefect_task(name="lazy-double", retries=0)(_double)

    @flow(name="lazy-task-flow")
    def f() -> tuple[int, int]:
        return lazy(21), lazy.submit(4).result()

    state = f(return_state=True)
    assert state.result() == (42, 8)

    async def runs() -> list[str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            trs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return sorted(t.name.rsplit("-", 1)[0] for t in trs)

    import asyncio

    assert asyncio.run(runs()) == ["lazy-double", "lazy-double"]
