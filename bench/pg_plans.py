"""The plans PostgreSQL chooses for the statements our steps really run, at scale.

    python bench/pg_plans.py --database-url postgresql+psycopg://postgres@127.0.0.1/postgres --n 1000000 \
        --out bench/notes/postgresql-plans.md

In a new database on that server it runs extract -> validate -> segment -> render of the demo CRM (N
contacts), the campaign's accounting, one send claim of 50,000 messages and the outcomes query, with the
same functions the Prefect tasks call, while a SQLAlchemy listener records every statement, its
parameters and its time. Then each of the slowest distinct statements is run again under
``EXPLAIN (ANALYZE, BUFFERS)`` with the parameters it had, inside a transaction that is rolled back
(an UPDATE explained changes nothing), and the plans are written as Markdown. Bulk writes (COPY,
INSERT ... SELECT from the staging table) are listed with their times but not explained.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stores import fresh_store  # noqa: E402 - after the path


class Recorder:
    """Every statement's total time, calls and the parameters of its slowest call."""

    def __init__(self, engine):
        from sqlalchemy import event

        self.stats: dict[str, dict] = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "slowest": 0.0, "params": None,
                                                            "step": None})
        self.step = "setup"

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn, cursor, statement, parameters, context, executemany):
            conn.info.setdefault("_t", []).append(time.perf_counter())

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn, cursor, statement, parameters, context, executemany):
            dt = time.perf_counter() - conn.info["_t"].pop()
            key = re.sub(r"\s+", " ", statement).strip()
            s = self.stats[key]
            s["calls"] += 1
            s["seconds"] += dt
            s["step"] = s["step"] or self.step
            if dt >= s["slowest"] and not executemany:
                s["slowest"], s["params"] = dt, parameters


EXPLAINABLE = re.compile(r"^(WITH|SELECT|UPDATE|DELETE)\b", re.I)


def explain(engine, statement: str, params) -> str:
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()
        finally:
            tx.rollback()
    return "\n".join(r[0] for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", required=True, help="a PostgreSQL server (a new database is made and dropped)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--top", type=int, default=12, help="how many of the slowest statements to explain")
    ap.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    a = ap.parse_args(argv)

    from blocks.crm import SqlCrm
    from smsflow.demo_crm import write_crm_sqlite
    from store.db import get_engine, utcnow
    from tasks.accounting import campaign_accounting
    from tasks.extract import extract_source
    from tasks.outcomes import message_outcomes
    from tasks.render import open_campaign, plan_messages
    from tasks.segment import ALL, build_membership
    from tasks.send import claim
    from tasks.validate import validate_new_contacts

    d = Path(tempfile.mkdtemp(prefix="smsflow-pg-plans-"))
    t = time.perf_counter()
    crm = write_crm_sqlite(d / "crm.sqlite", a.n, seed=42)
    print(f"demo CRM of {a.n:,} contacts in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    timings: dict[str, float] = {}
    with fresh_store(a.database_url, d, "plans") as url:
        engine = get_engine(url)
        rec = Recorder(engine)
        src = SqlCrm(url=f"sqlite:///{crm}", source_name="plans")

        def step(name, fn):
            rec.step = name
            t0 = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - t0
            print(f"{name}: {timings[name]:.2f}s", file=sys.stderr)
            return out

        step("extract", lambda: extract_source(engine, src, batch_size=50_000, processes=2))
        step("validate", lambda: validate_new_contacts(engine, "plans", "RU", 2))
        step("segment", lambda: build_membership(engine, "plans", ALL, utcnow()))
        cid, tpl = open_campaign(engine, name="plans", template=str(ROOT / "templates" / "demo_promo.yaml"),
                                 source="plans", segment="all", price_per_segment=2.5, gateway="sandbox")
        step("render", lambda: plan_messages(engine, campaign_id=cid, source="plans", segment="all", template=tpl,
                                             price_per_segment=2.5, gateway="sandbox", processes=2))
        step("accounting", lambda: campaign_accounting(engine, cid))
        step("claim 50,000", lambda: claim(engine, cid, 50_000, "plans"))
        step("outcomes", lambda: message_outcomes(engine, cid))

        ranked = sorted(rec.stats.items(), key=lambda kv: -kv[1]["seconds"])
        lines = [f"# PostgreSQL plans of the hot statements at {a.n:,} contacts",
                 "", f"`python bench/pg_plans.py --n {a.n} --database-url ...` (PostgreSQL "
                 f"{engine.dialect.server_version_info}), steps as the tasks run them:", "",
                 "| step | seconds |", "|---|---:|", *[f"| {k} | {v:.2f} |" for k, v in timings.items()], "",
                 "Statements run on the raw psycopg cursor (the bulk writes of `store.db`: `COPY` into a staging",
                 "table, then one `INSERT ... SELECT ... ON CONFLICT` or `UPDATE ... FROM`) are not seen by the",
                 "listener; the rest of each step's time is that and Python work (checks, phones, templates).", "",
                 "## Slowest statements (total time in the run)", "",
                 "| # | step | calls | total s | statement |", "|---:|---|---:|---:|---|"]
        for i, (sql, s) in enumerate(ranked[: a.top * 2], 1):
            lines.append(f"| {i} | {s['step']} | {s['calls']} | {s['seconds']:.2f} | `{sql[:110]}` |")
        lines += ["", "## Plans (EXPLAIN (ANALYZE, BUFFERS), the slowest call's parameters, rolled back)", ""]
        shown = 0
        for sql, s in ranked:
            if shown >= a.top or not EXPLAINABLE.match(sql) or s["params"] is None:
                continue
            shown += 1
            try:
                plan = explain(engine, sql, s["params"])
            except Exception as exc:  # noqa: BLE001 - a statement on a temp table of a finished transaction
                plan = f"(not explained: {type(exc).__name__}: {str(exc).splitlines()[0]})"
            lines += [f"### {shown}. {s['step']}: {s['calls']} call(s), {s['seconds']:.2f} s", "", "```sql",
                      sql[:1500], "```", "", "```", plan, "```", ""]
        text_out = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text_out)
        print(f"written {a.out}", file=sys.stderr)
    else:
        print(text_out)


if __name__ == "__main__":
    main()
