"""Retries only for what can heal: bad input fails at once, in one line."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from prefect.states import Failed
from sqlalchemy.exc import OperationalError

from blocks.crm import CrmSourceError
from blocks.gateway import GatewayUnavailable
from tasks.retrying import is_transient, retry_if_transient
from tests.e2e.test_crash_cli import cli_env


def _status(code: int) -> httpx.HTTPStatusError:
    req = httpx.Request("GET", "https://crm.example/api")
    return httpx.HTTPStatusError("x", request=req, response=httpx.Response(code, request=req))


def _wrapped(cause: BaseException) -> CrmSourceError:
    try:
        raise CrmSourceError("CRM unreachable") from cause
    except CrmSourceError as exc:
        return exc


@pytest.mark.parametrize("exc", [TimeoutError(), ConnectionRefusedError(), httpx.ConnectError("down"),
                                 httpx.ReadTimeout("slow"), _status(429), _status(503),
                                 OperationalError("SELECT 1", {}, Exception("database is locked")),
                                 GatewayUnavailable("down 600 s"), _wrapped(httpx.ConnectError("down"))])
def test_what_can_heal_is_retried(exc):
    assert is_transient(exc)
    assert retry_if_transient(None, None, Failed(data=exc))


@pytest.mark.parametrize("exc", [ValueError("column 'phone' missing"), KeyError("phone"), FileNotFoundError("x.csv"),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                 CrmSourceError("cannot read x.csv"), _status(400), _status(401), _status(404),
                                 _wrapped(ValueError("bad"))])
def test_bad_input_is_not_retried(exc):
    assert not is_transient(exc)
    assert not retry_if_transient(None, None, Failed(data=exc))


@pytest.mark.parametrize("content,extra,says", [
    (b"id,name\n1,x\n", [], "required column(s) phone not found"),
    (b"", [], "export.csv is empty"),
    ("id;first_name;phone\n1;Анна;89161234567\n".encode(), ["--delimiter", ","], "use --delimiter ';'"),
    ("id,phone\n1,Анна\n".encode("cp1251"), ["--encoding", "utf-8"], "is not valid utf-8"),
    (b"id,phone\n1,89161234567\n", ["--encoding", "klingon"], "unknown encoding"),
])
def test_campaign_on_a_bad_export_fails_at_once_in_one_line(tmp_path, content, extra, says):
    """Bad input: one 'error:' line, at once, before any Prefect run (the only other line allowed is
    the one saying how the file was read)."""
    src = tmp_path / "export.csv"
    src.write_bytes(content)
    tpl = tmp_path / "t.txt"
    tpl.write_text("Привет {{ first_name }}", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "smsflow.cli", "campaign", "--source-csv", str(src), "--template",
                        str(tpl), "--dry-run", *extra], env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if not ln.startswith("reading export.csv: ")] == lines[-1:], r.stderr
    assert lines[-1].startswith("error: ") and says in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and "prefect" not in r.stderr.lower()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "prefect-run"])
def test_a_failure_inside_the_flow_is_one_line_too(tmp_path, dry_run):
    """A row that breaks the CSV far below the header fails inside the extract: not retried, reported in
    one line, no traceback on the console; through Prefect (a real run) the traceback stays in the run's
    logs, the dry run (in-process, no Prefect) reports the same line."""
    rows = "".join(f"{i},+7916{i:07d},2026-01-01\n" for i in range(50))
    src = tmp_path / "export.csv"
    src.write_text("id,phone,updated_at\n" + rows + "51,+79160000051,2026-01-01,EXTRA,FIELDS\n", encoding="utf-8")
    tpl = tmp_path / "t.txt"
    tpl.write_text("Привет", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "smsflow.cli", "campaign", "--source-csv", str(src), "--template",
                        str(tpl), *(["--dry-run"] if dry_run else ["--wait", "0"])], env=cli_env(tmp_path),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: campaign failed: CrmSourceError") and "line 52" in last, last
    assert "Retries are exhausted" not in r.stderr
    assert r.stderr.count("Finished in state Failed") == (0 if dry_run else 1), r.stderr
