"""Moves the clock of every Python process of a test run, children included (CLI commands, Prefect
servers, workers), by TEST_CLOCK_SHIFT_DAYS, with time-machine (wall clock only: time.time,
datetime.now; monotonic clocks and timed waits stay real). Proves the suite passes on any date:

    TEST_CLOCK_SHIFT_DAYS=365 PYTHONPATH=$PWD/tests/clockshift bash scripts/test.sh

(libfaketime was tried first: it fakes CLOCK_MONOTONIC too, and Python's timed lock waits then hang.)
"""
import os

if os.environ.get("TEST_CLOCK_SHIFT_DAYS"):
    import datetime as _dt

    import time_machine

    _shift = _dt.timedelta(days=float(os.environ["TEST_CLOCK_SHIFT_DAYS"]))
    time_machine.travel(_dt.datetime.now(_dt.timezone.utc) + _shift, tick=True).start()
