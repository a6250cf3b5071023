"""An A/B campaign with a holdout through the commands users run, with kill -9 between and during the
phases: `smsflow campaign --ab` sends the test share, `smsflow ab-decide` (killed, rerun) decides and
rolls the winner out. The provider must see every contact outside the holdout exactly once, and no
contact may get two variants."""
from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from store.db import get_engine
from tests.e2e.test_crash_cli import cli_env, handed_over, smsflow
from tests.helpers import alive, contact, descendants, wait_for, write_csv

N = 1500


def _inputs(tmp_path):
    rows = [contact(i, first_name=f"T{i:05d}", phone=f"+7 916 {3000000 + i:07d}") for i in range(N)]
    csv = write_csv(tmp_path / "crm.csv", rows)
    (tmp_path / "a.txt").write_text("Скидка 10% [ref:{{ first_name }}]", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Только сегодня -15% [ref:{{ first_name }}]", encoding="utf-8")
    (tmp_path / "policy.yaml").write_text(
        'marketing_window: {start: "00:00:00", end: "23:59:59.999999", skip_holidays: false}\n'
        'transactional_window: {start: "00:00:00", end: "23:59:59.999999", skip_holidays: false}\n', encoding="utf-8")
    (tmp_path / "ab.yaml").write_text(
        "variants:\n  - name: A\n  - name: B\n    template: b.txt\nmetric: reply_rate\nholdout: 0.1\n"
        "test_share: 0.3\ndeadline_hours: 1\nfallback: control\n", encoding="utf-8")
    return csv


def _rows(store, sql):
    with get_engine(store).begin() as c:
        return c.execute(text(sql)).all()


def test_ab_campaign_survives_kill_9_between_and_during_the_phases(tmp_path):
    csv = _inputs(tmp_path)
    env = cli_env(tmp_path)
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    seed = int(time.time())
    rnd = random.Random(seed)
    print(f"seed {seed}", file=sys.stderr)
    r = subprocess.run(smsflow("campaign", "--source-csv", str(csv), "--template", str(tmp_path / "a.txt"), "--policy",
                               str(tmp_path / "policy.yaml"), "--ab", str(tmp_path / "ab.yaml"), "--name", "ab-crash",
                               "--wait", "0"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    ab = summary["ab"]
    test_n = ab["arms"]["A"] + ab["arms"]["B"]
    assert summary["planned"] == test_n and ab["holdout"] > 0 and ab["rollout"] > 0
    assert ab["holdout"] + test_n + ab["rollout"] == N
    assert "warning" in ab  # 1,500 contacts are far too few for a 1 pp effect: the run says so
    sent_test = handed_over(store)
    # the wake-up: past the deadline with no winner, so the control goes to the rest
    later = (datetime.now(timezone.utc) + timedelta(hours=2)).isoformat()
    args = smsflow("ab-decide", "--campaign", "ab-crash", "--now", later, "--rate", "60")
    kills = 0
    for moment in ("early", "sending"):
        p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if moment == "early":
            time.sleep(rnd.uniform(2, 8))  # starting, looking, deciding or rendering the rest
        else:
            wait_for(lambda: handed_over(store) >= sent_test + rnd.randint(20, 200) or p.poll() is not None,
                     "the roll-out to send", 180, 0.02)
        if p.poll() is None:
            family = descendants(p.pid)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            wait_for(lambda: not any(alive(c) for c in family), "the killed command's children to exit", 15)
            kills += 1
    assert kills >= 1
    out, err = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).communicate(
        timeout=600)
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert lines and lines[-1]["campaign"] == "ab-crash", err[-3000:]
    phase, winner, verdict = _rows(store, "SELECT phase, winner, verdict FROM ab_tests")[0]
    assert (phase, winner) == ("rolled_out", "A") and "no winner by the deadline" in verdict
    # one decision however often it was looked at
    assert len(_rows(store, "SELECT campaign_id FROM ab_tests WHERE decided_at IS NOT NULL")) == 1
    msgs = _rows(store, "SELECT contact_id, variant, step, state, text FROM outbox")
    held = {c for (c,) in _rows(store, "SELECT contact_id FROM ab_members")}
    assert len(held) == ab["holdout"] and not held & {m[0] for m in msgs}
    assert len(msgs) == len({m[0] for m in msgs}) == N - len(held)  # one message per contact, never two variants
    assert {m[1] for m in msgs if m[2] == "ab-rollout"} == {"A"}
    assert all(("-15%" in m[4]) == (m[1] == "B") for m in msgs)
    assert not [m for m in msgs if m[3] in ("planned", "queued")]
    db = sqlite3.connect(tmp_path / "data" / "sandbox_gateway.sqlite")
    rejected = sum(1 for m in msgs if m[3] == "rejected")
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == N - len(held) - rejected
    assert db.execute("SELECT COUNT(*) FROM submit_calls WHERE outcome = 'duplicate'").fetchone()[0] == 0
    # the report shows the test
    r = subprocess.run(smsflow("report", "--campaign", "ab-crash", "--json"), env=env, capture_output=True, text=True,
                       timeout=120)
    row = json.loads(r.stdout)
    assert row["ab"]["winner"] == "A" and set(row["ab"]["arms"]) == {"A", "B"}
    assert row["ab"]["arms"]["A"]["sent"] + row["ab"]["arms"]["B"]["sent"] <= test_n


def test_ab_dry_run_shows_the_sample_size_each_arm_needs_and_sends_nothing(tmp_path):
    from smsflow.abtest import ab_size

    csv = _inputs(tmp_path)
    env = cli_env(tmp_path)
    (tmp_path / "ab2.yaml").write_text("variants: [{name: A}, {name: B, template: b.txt}]\nholdout: 0.1\n"
                                       "baseline: 0.2\nmde: 0.05\npower: 0.9\n", encoding="utf-8")
    r = subprocess.run(smsflow("campaign", "--source-csv", str(csv), "--template", str(tmp_path / "a.txt"), "--ab",
                               str(tmp_path / "ab2.yaml"), "--name", "ab-dry", "--dry-run"),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ab = json.loads(r.stdout.strip().splitlines()[-1])["ab"]
    need = ab_size(0.2, 0.05, 0.05, 0.9)
    assert ab["per_arm_needed"] == need and ab["rollout"] == 0
    assert ab["holdout"] + ab["arms"]["A"] + ab["arms"]["B"] == N
    if min(ab["arms"].values()) < need:
        assert "audience too small" in ab["warning"] and "warning: audience too small" in r.stderr
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    assert handed_over(store) == 0  # planned, priced, nothing sent
    assert not (tmp_path / "data" / "sandbox_gateway.sqlite").exists() or sqlite3.connect(
        tmp_path / "data" / "sandbox_gateway.sqlite").execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_a_bad_ab_design_is_one_clear_error_before_anything_runs(tmp_path):
    csv = _inputs(tmp_path)
    env = cli_env(tmp_path)
    for body, message in (("variants: [{name: A}]\n", "variants"),
                          ("variants: [{name: A}, {name: B, template: missing.txt}]\n", "variant B"),
                          ("variants: [{name: A, template: b.txt}, {name: B, window: '18:00-21:00'}]\n",
                           "one element at a time"),
                          ("variants: [{name: A}, {name: B}]\nholdout: 0.9\n", "holdout")):
        (tmp_path / "bad.yaml").write_text(body, encoding="utf-8")
        r = subprocess.run(smsflow("campaign", "--source-csv", str(csv), "--template", str(tmp_path / "a.txt"), "--ab",
                                   str(tmp_path / "bad.yaml"), "--name", "ab-bad"), env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (body, r.stderr[-2000:])
        assert r.stdout == "" and not (tmp_path / "data" / "smsflow.sqlite").exists()
