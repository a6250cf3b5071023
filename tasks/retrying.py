"""Which failures a Prefect retry can heal.

A retry helps when the world may be different a few seconds later: a timeout, a refused or
dropped connection, HTTP 429/502/503/504, a database that is locked or restarting. It never
helps with bad input (a missing column, an undecodable file, a broken template, a wrong
password): retrying those only makes the user wait in silence before the same error.
Tasks pass ``retry_condition_fn=retry_if_transient``.
"""
from __future__ import annotations

import socket

import httpx
from sqlalchemy.exc import DBAPIError, OperationalError

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:  # the cause chain: a wrapper may carry a transient cause
        if _transient_itself(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _transient_itself(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError, socket.timeout, httpx.TransportError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_HTTP
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    from blocks.gateway import GatewayUnavailable  # here: only a failed task run asks, with Prefect loaded

    return isinstance(exc, GatewayUnavailable)


def retry_if_transient(_task, _task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only what can heal."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failure being judged
        return is_transient(exc)
    return False
