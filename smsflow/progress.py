"""One line per pipeline step for the person at the terminal (logger ``smsflow.progress``).

Flows report here as well as to their run logger; the CLI shows these lines on stderr (Prefect's
own run chatter stays at WARNING there), a deployment run has them in its run log anyway.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

_log = logging.getLogger("smsflow.progress")
_t0 = time.monotonic()


def step(name: str, message: str) -> None:
    _log.info("%6.1fs  %-9s %s", time.monotonic() - _t0, name, message)


def show_on_stderr() -> None:
    """Print progress lines on stderr (the CLI; stdout stays for the JSON contracts)."""
    global _t0
    _t0 = time.monotonic()
    mine = [h for h in _log.handlers if getattr(h, "_smsflow_progress", False)]
    if mine:
        mine[0].stream = sys.stderr  # the current stderr (a test runner may have swapped and closed the old one)
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._smsflow_progress = True  # type: ignore[attr-defined]
        _log.addHandler(h)
    _log.setLevel(logging.INFO)
    _log.propagate = False


# the step lines the campaign flow and the in-process dry run both print
def extracted_line(rows: int, quarantined: int) -> str:
    return f"{rows} CRM rows read, {quarantined} quarantined"


def validated_line(v: dict[str, Any]) -> str:
    return f"{v['checked']} checked: {v['valid']} valid, {v['quarantined']} quarantined, {v['duplicates']} duplicates"


def rendered_line(r: dict[str, Any]) -> str:
    return (f"{r['planned']} planned, {r['no_consent']} without consent, {r['render_failed']} failed to render, "
            f"{r['parts']} parts")
