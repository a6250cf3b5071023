"""The benchmarks' smallest sizes on PostgreSQL, as tests of correctness (not of speed): each drives
the real code (bench/cli.py the real command) into a new database on the server, which is dropped."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _bench_databases(pg_server: str) -> set[str]:
    eng = sa.create_engine(pg_server)
    try:
        with eng.connect() as c:
            return {r[0] for r in c.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'bench%'"))}
    finally:
        eng.dispose()


def test_cli_bench_previews_a_campaign_on_postgresql(pg_server, tmp_path):
    before = _bench_databases(pg_server)
    out = tmp_path / "cli.json"
    r = _bench("cli.py", "--sizes", "1000", "--no-naive", "--database-url", pg_server, "--json", str(out))
    res = json.loads(out.read_text())[0]
    s = res["cli"]["summary"]
    assert res["cli"]["rc"] == 0 and s["contacts"] == 1000
    assert s["quarantined"] + s["duplicates"] + s["no_consent"] + s["planned"] == 1000 and s["planned"] > 0
    assert "| 1,000 contacts |" in r.stdout and "(PostgreSQL)" in r.stdout
    assert _bench_databases(pg_server) == before  # the run's database is gone


def test_campaign_bench_plans_every_valid_contact_on_postgresql(pg_server, tmp_path):
    out = tmp_path / "campaign.json"
    _bench("campaign.py", "--sizes", "2000", "--no-naive", "--flow-max", "0", "--database-url", pg_server,
           "--json", str(out))
    p = json.loads(out.read_text())["2000"]["pipeline"]
    assert "error" not in p and p["counts"]["contacts"] == sum(p["counts"]["status"].values()) > 0
    assert p["counts"]["outbox"] == p["planned"] > 0


def test_reconcile_bench_applies_every_receipt_on_postgresql(pg_server):
    r = _bench("reconcile.py", "--n", "5000", "--database-url", pg_server, "--explain")
    assert "on postgresql" in r.stdout and "applied 5,000, left submitted: 0" in r.stdout, r.stdout
    # --explain: the plans of the staging and of both updates (explained in a rolled-back savepoint, then run:
    # every receipt was still applied once, above)
    assert all(p in r.stdout for p in ("Insert on _receipts_apply", "Update on outbox o", "Update on delivery_receipts")), \
        r.stdout
