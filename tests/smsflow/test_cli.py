"""CLI contracts, driven as other tools drive them: a subprocess, stdout parsed."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.helpers import write_csv


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smsflow.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Hello", {"encoding": "GSM-7", "characters": 5, "units": 5, "segments": 1}),
        ("a" * 161, {"encoding": "GSM-7", "characters": 161, "units": 161, "segments": 2}),
        ("€" * 80, {"encoding": "GSM-7", "characters": 80, "units": 160, "segments": 1}),
        ("Привет", {"encoding": "UCS-2", "characters": 6, "units": 6, "segments": 1}),
        ("я" * 71, {"encoding": "UCS-2", "characters": 71, "units": 71, "segments": 2}),
        ("😀" * 35, {"encoding": "UCS-2", "characters": 35, "units": 70, "segments": 1}),
    ],
)
def test_sms_info_prints_one_json_object(text, expected):
    res = run("sms-info", text)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == expected
    assert res.stdout.count("\n") == 1


def test_validate_keeps_every_row_in_order(tmp_path):
    rows = [
        {"id": "1", "phone": "8 (916) 123-45-67", "updated_at": "2026-01-01"},
        {"id": "2", "phone": "+7 495 123-45-67", "updated_at": "2026-01-01"},
        {"id": "3", "phone": "", "updated_at": "2026-01-01"},
        {"id": "4", "phone": "не телефон", "updated_at": "2026-01-01"},
        {"id": "5", "phone": "+7 916 1234567", "updated_at": "2026-06-01"},
    ]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.csv"
    res = run("validate", str(src), "--out", str(out))
    assert res.returncode == 0, res.stderr
    with open(out, encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [r["id"] for r in got] == ["1", "2", "3", "4", "5"]
    assert [r["phone_status"] for r in got] == ["duplicate", "not_mobile", "missing", "invalid", "ok"]
    assert got[0]["duplicate_of"] == "4" and got[4]["duplicate_of"] == ""
    assert got[4]["phone_e164"] == "+79161234567"
    assert all(r["reason"] for r in got[:4]) and got[4]["reason"] == ""


def test_validate_errors_are_clear_and_nonzero(tmp_path):
    res = run("validate", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o.csv"))
    assert res.returncode != 0 and "missing.csv" in res.stderr
    src = write_csv(tmp_path / "in.csv", [{"id": "1", "tel": "89161234567"}])
    res = run("validate", str(src), "--out", str(tmp_path / "o.csv"))
    assert res.returncode != 0 and "phone" in res.stderr and "tel" in res.stderr
    res = run("validate", str(src), "--out", str(tmp_path / "o.csv"), "--phone-column", "tel")
    assert res.returncode == 0, res.stderr


def test_validate_reads_russian_excel_exports(tmp_path):
    """cp1251 + ';' detected and said on stderr; options override; XLSX read; output is UTF-8 ','."""
    src = tmp_path / "crm.csv"
    src.write_bytes("id;Имя;Телефон\n1;Иван;8 (916) 123-45-67\n2;Анна;+7 916 123-45-67\n".encode("cp1251"))
    out = tmp_path / "out.csv"
    res = run("validate", str(src), "--out", str(out), "--phone-column", "Телефон")
    assert res.returncode == 0, res.stderr
    assert "reading crm.csv: CSV, encoding cp1251 (detected), delimiter ';' (detected)" in res.stderr
    with open(out, encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [(r["Имя"], r["phone_e164"], r["phone_status"]) for r in got] == [
        ("Иван", "+79161234567", "ok"), ("Анна", "+79161234567", "duplicate")]
    res = run("validate", str(src), "--out", str(out), "--phone-column", "Телефон", "--delimiter", ",")
    assert res.returncode == 2 and "--delimiter ';'" in res.stderr and res.stderr.count("\n") <= 2, res.stderr
    res = run("validate", str(src), "--out", str(out), "--phone-column", "Телефон", "--encoding", "utf-8")
    assert res.returncode == 2 and "not valid utf-8" in res.stderr and "Traceback" not in res.stderr
    res = run("validate", str(src), "--out", str(out), "--phone-column", "Телефон", "--encoding", "cp1251",
              "--delimiter", "semicolon")
    assert res.returncode == 0 and "encoding cp1251, delimiter ';'" in res.stderr

    from openpyxl import Workbook

    wb = Workbook()
    wb.active.append(["id", "phone"])
    wb.active.append([1, 79161234567])
    wb.save(tmp_path / "crm.xlsx")
    res = run("validate", str(tmp_path / "crm.xlsx"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    with open(out, encoding="utf-8") as f:
        assert [r["phone_e164"] for r in csv.DictReader(f)] == ["+79161234567"]


def test_setup_is_silent_and_instant_when_nothing_changed():
    """scripts/setup.sh after a successful install (the suite runs after one): no pip run, no output."""
    from smsflow.settings import PROJECT_ROOT

    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    again = subprocess.run(["bash", "scripts/setup.sh"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_dry_run_is_a_preview_without_prefect(tmp_path, any_store):
    """`campaign --dry-run` as a user runs it (no Prefect server configured), on both stores: no temporary Prefect
    API is started, nothing lands in Prefect's home (no database, no runs), Prefect is not even imported in the
    command's process (1.4-1.8 s of a preview's start-up); the store has the plan."""
    from tests.e2e.test_crash_cli import cli_env
    from tests.helpers import contact

    rows = [contact(i) for i in range(40)]
    src = write_csv(tmp_path / "crm.csv", rows)
    tpl = tmp_path / "t.txt"
    tpl.write_text("{{ first_name }}, скидка 10%", encoding="utf-8")
    env = {**cli_env(tmp_path), "SMSFLOW_DATABASE_URL": any_store}
    r = subprocess.run([sys.executable, "-c", _IN_PROCESS, "campaign", "--source", str(src), "--template", str(tpl),
                        "--dry-run", "--name", "preview"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["planned"] == 40 and summary["contacts"] == 40
    assert "Prefect API" not in r.stderr and "(dry run, in this process)" in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith('{"gx_in_main"')]
    assert json.loads(line)["prefect_in_main"] is False
    home = tmp_path / "prefect-home"
    assert not home.exists() or not any(home.rglob("*.db")), list(home.rglob("*"))
    from sqlalchemy import text

    from store.db import get_engine

    with get_engine(any_store).begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar() == 40


_IN_PROCESS = """
import json, os, sys
if __name__ == "__main__":  # spawned workers import this script too
    from smsflow.cli import app
    real_exit = os._exit

    def report():
        print(json.dumps({"gx_in_main": "great_expectations" in sys.modules, "prefect_in_main": "prefect" in sys.modules}),
              file=sys.stderr, flush=True)

    def exit_now(code):  # a preview ends with os._exit (smsflow.cli._exit_now)
        report()
        real_exit(code)

    os._exit = exit_now
    app(sys.argv[1:], standalone_mode=False)
    report()
"""


def test_a_small_dry_run_checks_in_its_warmed_worker_with_the_same_verdicts(tmp_path):
    """A small export: the command starts its checks worker first (smsflow.warm), Great Expectations is imported
    there, never in the command's process; the preview is the same as with one process (no worker), and it ends
    without a warning on the terminal."""
    from tests.e2e.test_crash_cli import cli_env
    from tests.helpers import contact

    rows = [contact(i, **({"phone": "12"} if i % 9 == 0 else {"phone": "+7 495 123-45-67"} if i % 11 == 0 else {}))
            for i in range(300)]
    rows += [contact(i) for i in range(5)]  # duplicates of CRM ids
    src = write_csv(tmp_path / "crm.csv", rows)
    tpl = tmp_path / "t.txt"
    tpl.write_text("{{ first_name }}, скидка 10%", encoding="utf-8")
    out = {}
    for workers in ("2", "1"):
        env = {**cli_env(tmp_path / f"w{workers}"), "SMSFLOW_WORKERS": workers}
        r = subprocess.run([sys.executable, "-c", _IN_PROCESS, "campaign", "--source", str(src), "--template", str(tpl),
                            "--dry-run", "--name", "preview"], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        (line,) = [x for x in r.stderr.splitlines() if x.startswith('{"gx_in_main"')]
        gx = json.loads(line)["gx_in_main"]
        out[workers] = (summary, gx)
    (warm, gx_warm), (single, gx_single) = out["2"], out["1"]
    assert not gx_warm and gx_single  # the worker did the checks; with one process they ran here
    keys = ("contacts", "planned", "quarantined", "bad_phone", "duplicates", "no_consent", "parts", "cost_planned")
    assert {k: warm.get(k) for k in keys} == {k: single.get(k) for k in keys}
    assert warm["planned"] > 0 and warm["planned"] < 300
    # the console command (it ends with os._exit, its worker killed): the same preview, and no named semaphore
    # left behind for multiprocessing's resource tracker to warn of ("leaked semaphore objects") on the terminal
    env = {**cli_env(tmp_path / "console"), "SMSFLOW_WORKERS": "2"}
    r = subprocess.run([sys.executable, "-m", "smsflow.cli", "campaign", "--source", str(src), "--template", str(tpl),
                        "--dry-run", "--name", "preview"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    console = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: console.get(k) for k in keys} == {k: single.get(k) for k in keys}
    assert "Warning" not in r.stderr and "leaked" not in r.stderr, r.stderr[-2000:]


def test_archive_command_prints_one_json_object_and_refuses_clearly(tmp_path):
    """`smsflow archive`: a campaign with messages not yet final is refused in one line (exit 2);
    a finished, old one is archived and the command prints one JSON object."""
    from datetime import timedelta

    from sqlalchemy import text

    from store.db import dispose_engines, get_engine, utcnow
    from tasks.accounting import ensure_campaign
    from tests.e2e.test_crash_cli import cli_env

    env = {**cli_env(tmp_path), "SMSFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}"}
    engine = get_engine(env["SMSFLOW_DATABASE_URL"])
    old = utcnow() - timedelta(days=45)
    for name, state in (("done", "delivered"), ("busy", "submitted")):
        cid = ensure_campaign(engine, name=name, source="s", segment="all", template_name="t", kind="marketing",
                              gateway="sandbox", price_per_segment=1.0)
        with engine.begin() as c:
            c.execute(text("INSERT INTO outbox (idempotency_key, campaign_id, step, encoding, segments, cost, state, "
                           "attempts, planned_at, updated_at) VALUES (:k, :c, 'main', 'GSM-7', 1, 1.0, :s, 1, :t, :t)"),
                      {"k": f"{name}:1", "c": cid, "s": state, "t": old})
    dispose_engines()
    busy = subprocess.run([sys.executable, "-m", "smsflow.cli", "archive", "--campaign", "busy"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and busy.stdout == ""
    assert busy.stderr.strip().splitlines() == ["error: campaign 'busy' still has 1 message(s) planned, queued or "
                                                "submitted; archive it once every message is final"]
    done = subprocess.run([sys.executable, "-m", "smsflow.cli", "archive", "--campaign", "done"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["campaign"] == "done" and out["messages"] == 1 and out["summary"]["outcomes"]["delivered"] == 1
