"""Benchmark: CRM -> outbox throughput of the smsflow pipeline vs a naive per-row script.

This is a benchmark, not a test: it prints numbers.

    . .venv/bin/activate
    python bench/campaign.py                      # sizes 10000 100000 1000000
    python bench/campaign.py --sizes 10000        # quick run
    python bench/campaign.py --sizes 100000 --profile   # cProfile every step (timings then inflated)

For every size N it, in a fresh temp dir:

1. writes a demo CRM (``smsflow.demo_crm.write_crm_sqlite(path, N, seed=42)``), timed on its own;
2. runs extract -> validate -> segment -> render-into-outbox on a fresh SQLite store with the same
   plain functions the Prefect tasks call (no Prefect server), timing every step;
3. runs a NAIVE per-row script on the same CRM (sqlite3 cursor loop; phonenumbers
   parse/is_valid/number_type/format per row; Jinja2 SandboxedEnvironment render per row;
   ``session.add(Contact(...))`` / ``session.add(Outbox(...))`` one by one, one commit at the end)
   on min(N, --naive-max) rows, extrapolated linearly to N when capped;
4. times the bare library calls (phonenumbers parse+validate+format; Jinja2 render) per row;
5. optionally (sizes <= --flow-max, default 10000) runs the real ``flows.campaign.campaign`` under
   ``prefect_test_harness`` and counts the task runs it created via the Prefect client.

Each phase runs in its own child process (this same file with ``--_phase``), so the peak RSS reported
for a phase belongs to that phase and size only.  Peak RSS (psutil is not installed in this venv):

* main process: VmHWM (= getrusage RUSAGE_SELF ru_maxrss), reset before every step through
  /proc/self/clear_refs so each step reports its own peak;
* process tree: sum of VmRSS over the process and its live descendants (the spawn workers of the
  phone-parsing and rendering pools), sampled every 50 ms from /proc -- the table's "peak RSS" is
  the larger of this and the main process' peak;
* largest worker: its own VmHWM, sampled.  RUSAGE_CHILDREN ru_maxrss is printed too but overstates:
  Linux carries the parent's RSS at fork time into the maxrss of a fork+exec'd (spawn) child.

CPU seconds (user+sys, workers included) are printed next to wall seconds: this machine is shared,
and CPU time is what other load does not distort.  Unless --no-breakdown is given, the main functions of
each step (read_frame, bulk_insert/bulk_update/executemany, prepare_contacts, check_extract,
normalize_phones_parallel, dedup_source, _contacts_for, _store_chunk, SqlCrm.fetch, ...) are wrapped
with wall-clock timers (exclusive of nested timed calls); --profile runs cProfile instead (much
slower: it inflates per-row Python calls) and writes profile-<step>.txt/.prof into the kept temp dir.

The extract validates on the way in (one write per contact): a reader process reads the CRM and cleans
the rows while its worker runs the Great Expectations checks and parses the phones, and this process
writes. The breakdown above only sees this process (the writer); the reader's own wall time per phase
is printed on the "reader" line under the extract.

At the end a Markdown table (one row per size) is printed, plus linearity and the project targets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stores import fresh_store, store_label  # noqa: E402 - after the path

TEMPLATE = ROOT / "templates" / "demo_promo.yaml"
SOURCE = "bench"
SEED = 42
BATCH = 50_000
PROCESSES = 2
PRICE = 2.5
STEPS = ("extract", "validate", "segment", "render")

# targets the project aims for
TARGET_1M_SECONDS = 60.0
TARGET_SPEEDUP = 3.0
TARGET_RSS_MIB = 2048.0
LINEAR_TOLERANCE = 1.25  # s/100k at the largest size at most 25 % above s/100k at 100k


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory


def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _short(cmdline: bytes) -> str:
    """A process' command line, short: the program and what it runs (a spawn worker says so)."""
    parts = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if "-c" in parts and any("spawn_main" in a for a in parts):
        return "spawn worker"
    return " ".join(Path(parts[0]).name if i == 0 else a for i, a in enumerate(parts[:3]))[:60]


def _tree(pid: int) -> list[int]:
    """pid and all its live descendants (Linux /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


class TreeRss(threading.Thread):
    """Samples the summed VmRSS of a process (default: this one) and its descendants; keeps the peak."""

    def __init__(self, interval: float = 0.05, root: int | None = None):
        super().__init__(daemon=True)
        self.interval = interval
        self.root = root
        self.peak_kib = 0
        self.peak_procs = 0
        self.peak_detail: list[tuple[int, str, int]] = []  # (pid, what it runs, KiB) at the peak
        self.worker_hwm_kib = 0  # largest VmHWM seen in a live descendant (its own, post-exec, peak)
        self._halt = threading.Event()
        self.step_peak_kib = 0
        self.t0 = time.perf_counter()
        self.peak_at = 0.0  # seconds after the sampler was made

    def run(self) -> None:
        me = self.root or os.getpid()
        my_cmd = _cmdline(me)
        while not self._halt.is_set():
            # a child caught between fork and exec still maps (and shares) all of our pages: skip it
            pids = [p for p in _tree(me) if p == me or _cmdline(p) != my_cmd]
            each = [(p, _status_kib(p, "VmRSS") or 0) for p in pids]
            total = sum(k for _, k in each)
            for p in pids:
                if p != me:
                    self.worker_hwm_kib = max(self.worker_hwm_kib, _status_kib(p, "VmHWM") or 0)
            if total > self.peak_kib:
                self.peak_kib, self.peak_procs = total, len(pids)
                self.peak_detail = [(p, _short(_cmdline(p)), k) for p, k in each]
                self.peak_at = time.perf_counter() - self.t0
            self.step_peak_kib = max(self.step_peak_kib, total)
            self._halt.wait(self.interval)

    def take_step_peak(self) -> float:
        v, self.step_peak_kib = self.step_peak_kib, 0
        return v / 1024

    def stop(self) -> None:
        self._halt.set()
        self.join(1)


def reset_hwm() -> bool:
    """Reset this process' peak RSS (VmHWM and ru_maxrss) so the next step's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def self_hwm_mib() -> float:
    v = _status_kib("self", "VmHWM")
    if v is None:
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return v / 1024


def cpu_seconds() -> float:
    """user+sys CPU of this process and its reaped children (worker pools are reaped when a step ends)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def rusage_mib() -> dict[str, float]:
    return {
        "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------- child phases


def phase_gen(n: int, d: Path, _args) -> dict:
    from smsflow.demo_crm import write_crm_sqlite

    crm = d / "crm.sqlite"
    t0 = time.perf_counter()
    write_crm_sqlite(crm, n, seed=SEED)
    dt = time.perf_counter() - t0
    import sqlite3

    with sqlite3.connect(crm) as c:
        rows = c.execute("SELECT COUNT(*) FROM contacts").fetchone()[0]
    return {"seconds": dt, "rows": rows, "size_mib": crm.stat().st_size / 2**20, **rusage_mib()}


def _profiled(enabled: bool, d: Path, name: str, fn):
    if not enabled:
        return fn()
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    try:
        return pr.runcall(fn)
    finally:
        pr.dump_stats(str(d / f"profile-{name}.prof"))
        buf = io.StringIO()
        st = pstats.Stats(pr, stream=buf).strip_dirs()
        st.sort_stats("cumulative").print_stats(30)
        st.sort_stats("tottime").print_stats(25)
        (d / f"profile-{name}.txt").write_text(buf.getvalue())


def send_chunk() -> tuple[int, str]:
    """flows.send.SEND_CHUNK (read from the source text if the module cannot be imported right now)."""
    try:
        from flows.send import SEND_CHUNK

        return int(SEND_CHUNK), "flows.send"
    except Exception as exc:  # noqa: BLE001 - e.g. another module mid-edit
        import re

        m = re.search(r"^SEND_CHUNK\s*=\s*([0-9_]+)", (ROOT / "flows" / "send.py").read_text(), re.M)
        if not m:
            raise
        return int(m.group(1).replace("_", "")), f"flows/send.py text ({type(exc).__name__} on import)"


# Functions timed (wall, exclusive of nested timed calls) inside each step when --breakdown is on (the default).
# Only a few hundred calls per run go through these wrappers, so the overhead is negligible (unlike cProfile,
# which inflates the many small per-row calls several-fold). Names missing from the current code are skipped.
TIMED = (
    ("store.db", "read_frame"), ("store.db", "read_columns"), ("store.db", "bulk_insert"), ("store.db", "bulk_update"),
    ("store.db", "executemany"),
    ("tasks.extract", "prepare_contacts"), ("tasks.extract", "write_quarantine"), ("tasks.extract", "audit_consent_changes"),
    ("tasks.validate", "apply_verdicts"), ("tasks.validate", "_contact_ids"),
    ("tasks.validate", "check_extract"), ("tasks.validate", "normalize_phones_parallel"), ("smsflow.phones", "_prepare"),
    ("smsflow.phones", "_assemble"),
    ("tasks.dedup", "find_duplicates"), ("tasks.validate", "dedup_source"),
    ("tasks.validate", "_apply_suppression"), ("tasks.segment", "expand_attributes"), ("tasks.segment", "evaluate"),
    ("tasks.render", "_contacts_for"), ("tasks.render", "_store_chunk"),
)


class Breakdown:
    """Wall time per call path of the TIMED functions, exclusive of nested timed calls."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [label, start, child_time]

    def _enter(self, name: str) -> None:
        path = f"{self._stack[-1][0]}>{name}" if self._stack else name
        self._stack.append([path, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        path, t0, child = self._stack.pop()
        dt = time.perf_counter() - t0
        self.times[path] = self.times.get(path, 0.0) + dt - child
        self.calls[path] = self.calls.get(path, 0) + 1
        if self._stack:
            self._stack[-1][2] += dt

    def wrap(self, fn, name: str):
        import functools

        @functools.wraps(fn)
        def timed(*a, **k):
            if threading.current_thread() is not threading.main_thread():
                return fn(*a, **k)  # work overlapped in a helper thread is not broken down (shared stack)
            self._enter(name)
            try:
                return fn(*a, **k)
            finally:
                self._exit()

        return timed

    def wrap_gen(self, fn, name: str):
        """A generator method: time spent producing each item."""
        import functools

        @functools.wraps(fn)
        def timed(*a, **k):
            it = fn(*a, **k)
            if threading.current_thread() is not threading.main_thread():
                yield from it
                return
            while True:
                self._enter(name)
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self._exit()
                yield item

        return timed

    def install(self) -> list[str]:
        import importlib

        done = []
        for mod_name, attr in TIMED:
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001
                continue
            orig = getattr(mod, attr, None)
            if not callable(orig):
                continue
            w = self.wrap(orig, attr)
            for name, m in list(sys.modules.items()):
                if name.split(".")[0] in ("tasks", "store", "blocks", "flows") and getattr(m, attr, None) is orig:
                    setattr(m, attr, w)
            done.append(f"{mod_name}.{attr}")
        from blocks.crm import SqlCrm

        SqlCrm.fetch = self.wrap_gen(SqlCrm.fetch, "SqlCrm.fetch")
        done.append("blocks.crm.SqlCrm.fetch")
        return done

    def take(self) -> dict[str, dict]:
        out = {k: {"seconds": v, "calls": self.calls[k]} for k, v in sorted(self.times.items(), key=lambda kv: -kv[1])}
        self.times, self.calls = {}, {}
        return out


def phase_pipeline(n: int, d: Path, args) -> dict:
    chunk, chunk_from = send_chunk()  # before the timed steps: a late import error must not waste a 1M run
    sampler = TreeRss()
    sampler.start()
    t_imp = time.perf_counter()
    from sqlalchemy import text

    from blocks.crm import SqlCrm
    from store.db import get_engine, utcnow
    from tasks.accounting import ensure_campaign
    from tasks.extract import extract_source
    from tasks.render import plan_messages
    from smsflow.templates import load_template
    from tasks.segment import ALL, build_membership
    from tasks.validate import validate_new_contacts

    imports = time.perf_counter() - t_imp
    bd = Breakdown() if args.breakdown and not args.profile else None
    if bd is not None:
        bd.install()
    crm = d / "crm.sqlite"
    t0 = time.perf_counter()
    engine = get_engine(args.store_url or f"sqlite:///{d}/store.sqlite")  # creates + migrates the schema
    init = time.perf_counter() - t0
    tpl = load_template(TEMPLATE)
    source = SqlCrm(url=f"sqlite:///{crm}", source_name=SOURCE)
    res: dict = {}

    def extract():
        s = extract_source(engine, source, batch_size=BATCH, default_region="RU", processes=PROCESSES)
        res["extract"] = {"rows": s.rows, "upserted": s.upserted, "validated": s.validated, "quarantined": s.quarantined,
                          "duplicate_ids": s.duplicate_ids}
        # reading, checking and classifying run in a reader process beside the writer: its own time by phase
        res["extract_reader"] = {k: round(v, 2) for k, v in s.reader_seconds.items()}

    def validate():
        s = validate_new_contacts(engine, SOURCE, "RU", processes=PROCESSES)
        res["validate"] = {"checked": s.checked, "valid": s.valid, "quarantined": s.quarantined,
                           "duplicates": s.duplicates, "by_status": s.by_status,
                           "expectations_success": s.expectations_success}

    def segment():
        res["segment"] = {"members": build_membership(engine, SOURCE, ALL, utcnow())}

    def render():
        cid = ensure_campaign(engine, name="bench", source=SOURCE, segment="all", template_name=tpl.name, kind=tpl.kind,
                              gateway="sandbox", price_per_segment=PRICE)
        s = plan_messages(engine, campaign_id=cid, source=SOURCE, segment="all", template=tpl, price_per_segment=PRICE,
                          gateway="sandbox", batch_size=BATCH, processes=PROCESSES)
        res["render"] = {"campaign_id": cid, "candidates": s.candidates, "no_consent": s.no_consent,
                         "planned": s.planned, "render_failed": s.render_failed, "segments": s.segments,
                         "cost": round(s.cost, 2)}

    steps: dict[str, dict] = {}
    hwm_reset_ok = True
    t_all, c_all = time.perf_counter(), cpu_seconds()
    for name, fn in zip(STEPS, (extract, validate, segment, render)):
        hwm_reset_ok &= reset_hwm()
        sampler.take_step_peak()
        log(f"pipeline n={n}: {name} ...")
        t, c = time.perf_counter(), cpu_seconds()
        _profiled(args.profile, d, name, fn)
        dt = time.perf_counter() - t
        steps[name] = {"seconds": dt, "cpu_seconds": cpu_seconds() - c, "self_hwm_mib": self_hwm_mib(),
                       "tree_peak_mib": sampler.take_step_peak(), **res.get(name, {})}
        if name == "extract" and "extract_reader" in res:
            steps[name]["reader"] = res["extract_reader"]
        if bd is not None:
            steps[name]["breakdown"] = bd.take()
        log(f"pipeline n={n}: {name} {dt:.2f}s  ({n / dt:,.0f} contacts/s)")
        (d / "pipeline.partial.json").write_text(json.dumps(steps, default=str))
    e2e = time.perf_counter() - t_all
    e2e_cpu = cpu_seconds() - c_all
    time.sleep(2 * sampler.interval)
    sampler.stop()
    try:
        with engine.begin() as conn:
            counts = {
                "contacts": conn.execute(text("SELECT COUNT(*) FROM contacts")).scalar(),
                "outbox": conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar(),
                "quarantine": dict(conn.execute(text(
                    "SELECT step || ':' || reason_code, COUNT(*) FROM quarantine GROUP BY 1")).all()),
                "status": dict(conn.execute(text("SELECT status, COUNT(*) FROM contacts GROUP BY status")).all()),
            }
    except Exception as exc:  # noqa: BLE001 - counts are informative only
        counts = {"error": repr(exc), "contacts": None, "outbox": None, "quarantine": None, "status": None}
    store_mib = sum(p.stat().st_size for p in d.glob("store.sqlite*")) / 2**20
    planned = res["render"]["planned"]
    send_tasks = math.ceil(planned / chunk) + 1  # the send loop stops on a task that claims 0
    return {
        "imports_seconds": imports,
        "store_init_seconds": init,
        "steps": steps,
        "e2e_seconds": e2e,
        "e2e_cpu_seconds": e2e_cpu,
        "counts": counts,
        "store_mib": store_mib,
        "tree_peak_mib": sampler.peak_kib / 1024,
        "tree_peak_procs": sampler.peak_procs,
        "worker_peak_mib": sampler.worker_hwm_kib / 1024,
        "hwm_reset_ok": hwm_reset_ok,
        "send_chunk": chunk,
        "send_chunk_from": chunk_from,
        "task_runs": {
            # campaign flow: one task per step in each sub-flow (extract, validate, segment, render,
            # reconcile, report) + the send flow's loop of send-batch tasks, each claiming <= SEND_CHUNK
            "dry_run": 4,
            "send_tasks": send_tasks,
            "full": 4 + send_tasks + 2,
            # Prefect 3 also records one task run in the parent per sub-flow call (4 in a dry run, 7 in a full run)
            "dry_run_rows": 4 + 4,
            "full_rows": 4 + send_tasks + 2 + 7,
        },
        "profiled": bool(args.profile),
        "planned": planned,
        **rusage_mib(),
    }


def phase_naive(n: int, d: Path, args) -> dict:
    """Per-row script: what the pipeline replaces.  Same CRM, same rules (RU default region, mobile only,
    consent, de-dup on E.164, template variant by language + opt-out footer, segments/cost)."""
    import sqlite3
    from datetime import datetime

    import phonenumbers
    import yaml
    from jinja2.sandbox import SandboxedEnvironment
    from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType
    from sqlalchemy.orm import Session

    from store.db import get_engine
    from store.models import Campaign, Contact, Outbox
    from smsflow.templates import DEFAULT_FOOTERS
    from smsflow.sms_encoding import sms_info

    m = min(n, args.naive_max)
    engine = get_engine(f"sqlite:///{d}/naive.sqlite")  # schema creation not timed
    spec = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    env = SandboxedEnvironment()
    compiled = {lang: env.from_string(src) for lang, src in spec["variants"].items()}
    default_lang = spec.get("default_language", "ru")
    mobile = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
    base_cols = {"id", "first_name", "last_name", "phone", "email", "language", "timezone", "sms_consent",
                 "consent_at", "updated_at"}

    def ts(v):
        return datetime.fromisoformat(v) if v else None

    def blank(v):
        return v.strip() or None if isinstance(v, str) else v

    reset_hwm()
    log(f"naive n={n}: per-row loop over {m:,} rows ...")
    t0, c0 = time.perf_counter(), cpu_seconds()
    crm = sqlite3.connect(d / "crm.sqlite")
    cur = crm.execute("SELECT * FROM contacts ORDER BY updated_at LIMIT ?", (m,))
    cols = [c[0] for c in cur.description]
    session = Session(engine)
    camp = Campaign(name="naive", source="naive", segment="all", template_name=spec["name"], kind=spec["kind"],
                    gateway="sandbox", price_per_segment=PRICE, status="running")
    session.add(camp)
    session.flush()
    seen: set[str] = set()
    rows = planned = 0
    for i, row in enumerate(cur, 1):
        rows += 1
        r = dict(zip(cols, row))
        phone = r["phone"]
        e164 = reason = None
        status = "quarantined"
        if phone and phone.strip():
            try:
                num = phonenumbers.parse(phone, "RU")
                if phonenumbers.is_valid_number(num):
                    ntype = phonenumbers.number_type(num)
                    e = phonenumbers.format_number(num, PhoneNumberFormat.E164)
                    if ntype in mobile:
                        e164, status = e, "valid"
                    else:
                        reason = "not_mobile"
                else:
                    reason = "invalid"
            except NumberParseException as exc:
                reason = f"invalid: {exc}"
        else:
            reason = "missing"
        if status == "valid":
            if e164 in seen:
                status, reason = "duplicate", "same number"
            else:
                seen.add(e164)
        consent = bool(r["sms_consent"])
        lang = (blank(r["language"]) or default_lang).lower()[:8]
        session.add(Contact(
            id=i, source="naive", crm_id=str(r["id"]), first_name=blank(r["first_name"]), last_name=blank(r["last_name"]),
            email=blank(r["email"]), phone_raw=phone, phone_e164=e164, language=lang, timezone=r["timezone"],
            sms_consent=consent, consent_at=ts(r["consent_at"]), attributes={k: v for k, v in r.items() if k not in base_cols and v is not None},
            crm_updated_at=ts(r["updated_at"]), status=status, status_reason=reason,
        ))
        if status == "valid" and consent:
            variant = lang if lang in compiled else lang.split("-")[0] if lang.split("-")[0] in compiled else default_lang
            ctx = {}
            if blank(r["first_name"]):
                ctx["first_name"] = r["first_name"].strip()
            body = compiled[variant].render(**ctx).strip() + "\n" + DEFAULT_FOOTERS[variant]
            info = sms_info(body)
            session.add(Outbox(
                idempotency_key=f"c{camp.id}:{i}:{spec['name']}", campaign_id=camp.id, contact_id=i, step=spec["name"],
                segment="all", phone_e164=e164, language=variant, text=body, encoding=info.encoding,
                segments=info.segments, cost=round(info.segments * PRICE, 4), state="planned", attempts=0,
                gateway="sandbox",
            ))
            planned += 1
    t_loop = time.perf_counter() - t0
    session.commit()
    session.close()
    crm.close()
    total = time.perf_counter() - t0
    total_cpu = cpu_seconds() - c0
    naive_hwm = self_hwm_mib()
    log(f"naive n={n}: {total:.2f}s for {rows:,} rows (loop {t_loop:.2f}s, commit {total - t_loop:.2f}s)")

    # bare library calls on the same rows
    with sqlite3.connect(d / "crm.sqlite") as c:
        data = c.execute("SELECT phone, first_name, language FROM contacts ORDER BY updated_at LIMIT ?", (m,)).fetchall()
    phones = [p for p, _, _ in data if p and p.strip()]
    t = time.perf_counter()
    ok = 0
    for p in phones:
        try:
            num = phonenumbers.parse(p, "RU")
            if phonenumbers.is_valid_number(num):
                phonenumbers.number_type(num)
                phonenumbers.format_number(num, PhoneNumberFormat.E164)
                ok += 1
        except NumberParseException:
            pass
    t_phone = time.perf_counter() - t
    tmpl_ru = compiled[default_lang]
    names = [(f.strip() if isinstance(f, str) and f.strip() else None) for _, f, _ in data]
    t = time.perf_counter()
    for f in names:
        tmpl_ru.render(first_name=f) if f else tmpl_ru.render()
    t_jinja = time.perf_counter() - t
    scale = n / rows if rows else float("nan")
    return {
        "rows": rows,
        "planned": planned,
        "seconds": total,
        "cpu_seconds": total_cpu,
        "loop_seconds": t_loop,
        "commit_seconds": total - t_loop,
        "extrapolated": rows < n,
        "seconds_at_n": total * scale,
        "self_hwm_mib": naive_hwm,
        "phonenumbers_rows": len(phones),
        "phonenumbers_per_s": len(phones) / t_phone if t_phone else float("nan"),
        "jinja_rows": len(names),
        "jinja_per_s": len(names) / t_jinja if t_jinja else float("nan"),
        **rusage_mib(),
    }


def phase_flow(n: int, d: Path, args) -> dict:
    """The real campaign flow under a throw-away Prefect server; task runs counted via the client."""
    os.environ["SMSFLOW_DATA_DIR"] = str(d / "flowdata")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the throw-away server
    from prefect import get_client
    from prefect.testing.utilities import prefect_test_harness

    from blocks.crm import SqlCrm
    from blocks.gateway import SandboxGateway
    from flows.campaign import CampaignParams, campaign
    from smsflow.settings import reset_settings
    from store.db import dispose_engines

    url = args.store_url or f"sqlite:///{d}/flowstore.sqlite"
    os.environ["SMSFLOW_DATABASE_URL"] = url  # the flows use the worker's store, never a parameter
    reset_settings()

    def task_runs(client) -> list:
        out, off = [], 0
        while True:
            page = client.read_task_runs(limit=200, offset=off)
            out.extend(page)
            if len(page) < 200:
                return out
            off += 200

    out: dict = {}
    t = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        out["harness_start_seconds"] = time.perf_counter() - t
        SqlCrm(url=f"sqlite:///{d}/crm.sqlite", source_name=SOURCE).save("bench-crm", overwrite=True)
        SandboxGateway(state_path=str(d / "sandbox.sqlite"), min_delay_s=0.0, max_delay_s=0.5).save("bench-sandbox", overwrite=True)
        runs = [("dry_run", True)] + ([("full", False)] if args.flow_send else [])
        with get_client(sync_client=True) as client:
            for label, dry in runs:
                before = {tr.id for tr in task_runs(client)}
                log(f"flow n={n}: campaign ({label}) under prefect_test_harness ...")
                t = time.perf_counter()
                result = campaign(CampaignParams(name=f"bench-{label}", source_block="bench-crm", template=str(TEMPLATE),
                                                 gateway_block="bench-sandbox", dry_run=dry, wait_for_receipts_s=5.0))
                dt = time.perf_counter() - t
                new = [tr for tr in task_runs(client) if tr.id not in before]
                # a sub-flow call also leaves a task run in its parent (the flow run's parent_task_run_id)
                wrappers = {fr.parent_task_run_id for fr in client.read_flow_runs(limit=200) if fr.parent_task_run_id}
                by_name: dict[str, int] = {}
                for tr in new:
                    if tr.id in wrappers:
                        continue
                    key = tr.name.rsplit("-", 1)[0]  # "<task name>-<random suffix>"
                    by_name[key] = by_name.get(key, 0) + 1
                n_wrap = sum(1 for tr in new if tr.id in wrappers)
                out[label] = {"seconds": dt, "task_runs": len(new), "tasks": len(new) - n_wrap, "subflow_task_runs": n_wrap,
                              "by_task": by_name, "planned": result["summary"].get("planned")}
                log(f"flow n={n}: {label} {dt:.1f}s, {len(new)} task runs ({n_wrap} of them sub-flow wrappers) {by_name}")
    dispose_engines()
    return out


PHASES = {"gen": phase_gen, "pipeline": phase_pipeline, "naive": phase_naive, "flow": phase_flow}


def child_main(args) -> None:
    d = Path(args.dir)
    out = PHASES[args._phase](args.n, d, args)
    (d / f"{args._phase}.json").write_text(json.dumps(out, default=str, indent=1))


# --------------------------------------------------------------------------- orchestration


def run_child(phase: str, n: int, d: Path, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_phase", phase, "--n", str(n), "--dir", str(d),
           "--naive-max", str(args.naive_max)]
    if getattr(args, "store_url", None) and phase in ("pipeline", "flow"):
        cmd += ["--store-url", args.store_url]
    if args.profile:
        cmd.append("--profile")
    if not args.breakdown:
        cmd.append("--no-breakdown")
    if not args.flow_send:
        cmd.append("--no-flow-send")
    out = d / f"{phase}.json"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    load0 = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        log(f"{phase} n={n}: TIMEOUT after {args.timeout}s, stopping it")
        os.killpg(proc.pid, signal.SIGTERM)  # the child's own process group (it and its workers)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return {"error": f"timeout after {args.timeout}s"}
    if rc != 0 or not out.exists():
        err = {"error": f"exit code {rc} (traceback above on stderr)", "wall": time.perf_counter() - t}
        partial = d / f"{phase}.partial.json"
        if partial.exists():
            err["completed_steps"] = json.loads(partial.read_text())
        return err
    res = json.loads(out.read_text())
    res["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return res


def report_size(n: int, r: dict) -> None:
    g, p, nv, fl = r.get("gen") or {}, r.get("pipeline") or {}, r.get("naive"), r.get("flow")
    print(f"\n## {n:,} contacts")
    if "error" in g:
        print(f"demo CRM generation FAILED: {g['error']}")
        return
    print(f"demo CRM (write_crm_sqlite, not part of the pipeline): {g['seconds']:.2f} s, {g['rows']:,} rows, "
          f"{g['size_mib']:.0f} MiB")
    if "error" in p:
        print(f"pipeline FAILED: {p['error']}")
        for s, st in (p.get("completed_steps") or {}).items():
            print(f"  (completed before the failure) {s:<9} {st['seconds']:8.2f} s  {n / st['seconds']:>11,.0f} contacts/s  "
                  f"main peak {st['self_hwm_mib']:6.0f} MiB  tree peak {st['tree_peak_mib']:6.0f} MiB")
    else:
        print(f"store init (create + migrate, not timed as a step): {p['store_init_seconds']:.2f} s; "
              f"imports {p['imports_seconds']:.2f} s" + ("   [cProfile ON: timings inflated]" if p["profiled"] else ""))
        for s in STEPS:
            st = p["steps"][s]
            extra = {k: v for k, v in st.items()
                     if k not in ("seconds", "cpu_seconds", "self_hwm_mib", "tree_peak_mib", "breakdown", "reader")}
            print(f"  {s:<9} {st['seconds']:8.2f} s (cpu {st['cpu_seconds']:6.2f} s) {n / st['seconds']:>11,.0f} contacts/s  "
                  f"main peak {st['self_hwm_mib']:6.0f} MiB  tree peak {st['tree_peak_mib']:6.0f} MiB  {extra}")
            if st.get("breakdown"):
                parts = [f"{k} {v['seconds']:.2f}" for k, v in st["breakdown"].items() if v["seconds"] >= 0.005]
                rest = st["seconds"] - sum(v["seconds"] for v in st["breakdown"].values())
                print(f"              where (s, exclusive): {' | '.join(parts)} | rest of step {rest:.2f}")
            if st.get("reader"):
                parts = [f"{k} {v:.2f}" for k, v in st["reader"].items()]
                print(f"              reader (wall s, beside the writer): {' | '.join(parts)}")
        print(f"  {'extract->outbox':<9} {p['e2e_seconds']:.2f} s (cpu {p['e2e_cpu_seconds']:.2f} s, incl. workers)  "
              f"{n / p['e2e_seconds']:,.0f} contacts/s   [1-min load avg before/after: {p['loadavg_1m']}]")
        print(f"  peak RSS: main process {max(st['self_hwm_mib'] for st in p['steps'].values()):.0f} MiB (VmHWM = ru_maxrss, "
              f"max over steps); largest worker {p.get('worker_peak_mib', float('nan')):.0f} MiB (its own VmHWM, sampled); "
              f"whole tree {p['tree_peak_mib']:.0f} MiB (sum of VmRSS over {p['tree_peak_procs']} live processes, sampled "
              f"every 50 ms); RUSAGE_CHILDREN ru_maxrss {p['children_maxrss_mib']:.0f} MiB (overstates: Linux keeps the "
              f"parent's RSS at fork time in a spawn worker's maxrss)")
        print(f"  store: {p['counts']['contacts']:,} contacts {p['counts']['status']}, {p['counts']['outbox']:,} outbox rows, "
              f"quarantine {p['counts']['quarantine']}, {p['store_mib']:.0f} MiB on disk")
        tr = p["task_runs"]
        print(f"  task runs (COMPUTED from the flow code, SEND_CHUNK={p['send_chunk']:,}): dry-run campaign "
              f"{tr['dry_run']}; full campaign {tr['full']} = 4 steps + {tr['send_tasks']} send-batch "
              f"(ceil({p['steps']['render']['planned']:,}/{p['send_chunk']:,}) + 1 final empty claim) + reconcile + report; "
              f"plus one sub-flow wrapper task run per sub-flow call, so task-run rows in the API: dry-run "
              f"{tr['dry_run_rows']}, full {tr['full_rows']}")
    if fl:
        if "error" in fl:
            print(f"  real campaign flow under prefect_test_harness FAILED: {fl['error']}")
        else:
            for label in ("dry_run", "full"):
                if label in fl:
                    f = fl[label]
                    print(f"  task runs COUNTED via Prefect client, real flows.campaign ({label}, planned {f['planned']:,}): "
                          f"{f['tasks']} tasks {f['by_task']} + {f['subflow_task_runs']} sub-flow wrapper task runs = "
                          f"{f['task_runs']}; flow took {f['seconds']:.1f} s (harness start {fl['harness_start_seconds']:.1f} s)")
    if nv:
        if "error" in nv:
            print(f"naive FAILED: {nv['error']}")
        else:
            lab = f"EXTRAPOLATED from {nv['rows']:,} rows" if nv["extrapolated"] else "measured"
            print(f"naive per-row script: {nv['seconds']:.2f} s for {nv['rows']:,} rows (loop {nv['loop_seconds']:.2f} s, "
                  f"commit {nv['commit_seconds']:.2f} s), {nv['rows'] / nv['seconds']:,.0f} rows/s; "
                  f"{nv['seconds_at_n']:.1f} s at {n:,} ({lab}); cpu {nv['cpu_seconds']:.2f} s; {nv['planned']:,} outbox rows; "
                  f"peak {nv['self_hwm_mib']:.0f} MiB   [load avg {nv['loadavg_1m']}]")
            print(f"bare library calls on {nv['phonenumbers_rows']:,} rows: phonenumbers parse+is_valid+type+E164 "
                  f"{nv['phonenumbers_per_s']:,.0f}/s; Jinja2 Sandboxed render {nv['jinja_per_s']:,.0f}/s")


def peak_rss(p: dict) -> float:
    """Peak RSS of a pipeline run: the sampled process-tree sum, or the main process' exact peak if higher."""
    return max(p["tree_peak_mib"], max(st["self_hwm_mib"] for st in p["steps"].values()))


def table(results: dict[int, dict]) -> str:
    head = ("| contacts | extract s | validate s | segment s | render s | extract→outbox s | contacts/s | peak RSS MiB "
            "| task runs | naive s | speed-up |")
    lines = [head, "|" + "---:|" * 11]
    for n, r in results.items():
        p, nv = r.get("pipeline") or {}, r.get("naive") or {}
        if not p or "error" in p:
            lines.append(f"| {n:,} | " + " | ".join(["failed"] * 10) + " |")
            continue
        st = p["steps"]
        rss = peak_rss(p)
        naive_s = nv.get("seconds_at_n") if nv and "error" not in nv else None
        naive_txt = "—" if naive_s is None else f"{naive_s:,.1f}" + (" (extrap.)" if nv.get("extrapolated") else "")
        speed = "—"
        if naive_s is not None:
            speed = f"{naive_s / p['e2e_seconds']:.1f}×"
            if nv.get("cpu_seconds") and p.get("e2e_cpu_seconds"):
                speed += f" (CPU {nv['cpu_seconds'] * n / nv['rows'] / p['e2e_cpu_seconds']:.1f}×)"
        lines.append(
            f"| {n:,} | {st['extract']['seconds']:.2f} | {st['validate']['seconds']:.2f} | {st['segment']['seconds']:.2f} "
            f"| {st['render']['seconds']:.2f} | {p['e2e_seconds']:.2f} | {n / p['e2e_seconds']:,.0f} | {rss:,.0f} "
            f"| {p['task_runs']['full']} | {naive_txt} | {speed} |"
        )
    return "\n".join(lines)


def summary(results: dict[int, dict], store: str = "SQLite") -> None:
    ok = {n: r["pipeline"] for n, r in results.items() if r.get("pipeline") and "error" not in r["pipeline"]}
    print("\n## Table (Markdown)\n")
    print(table(results))
    print(f"\nSteps use the plain task functions on {store}, 2 worker processes, batch 50,000. Peak RSS = max(sampled sum "
          "of the process tree, main-process ru_maxrss). Task runs = a full (non-dry-run) campaign, computed from the flow "
          "code: 4 step tasks + ceil(planned/SEND_CHUNK)+1 send-batch + reconcile + report (a dry run creates 4; Prefect also "
          "records one wrapper task run per sub-flow call: +7 full, +4 dry run). "
          "Naive = per-row phonenumbers + Jinja2 + ORM session.add, capped at 100,000 rows and extrapolated linearly "
          "(marked). Speed-up = naive s / extract→outbox s; in brackets the same ratio in CPU seconds (user+sys incl. worker "
          "processes), which other load on the machine does not distort.")
    if ok:
        print("\n## Linearity (seconds per 100k contacts)\n")
        print("| contacts | " + " | ".join(STEPS) + " | extract→outbox |")
        print("|" + "---:|" * (len(STEPS) + 2))
        for n, p in ok.items():
            per = [p["steps"][s]["seconds"] * 1e5 / n for s in STEPS] + [p["e2e_seconds"] * 1e5 / n]
            print(f"| {n:,} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
        print("\nSame in CPU seconds (user+sys of the process and its workers; insensitive to other load on the machine):\n")
        print("| contacts | " + " | ".join(STEPS) + " | extract→outbox |")
        print("|" + "---:|" * (len(STEPS) + 2))
        for n, p in ok.items():
            per = [p["steps"][s]["cpu_seconds"] * 1e5 / n for s in STEPS] + [p["e2e_cpu_seconds"] * 1e5 / n]
            print(f"| {n:,} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
    print("\n## Targets\n")
    big = max(ok) if ok else None
    if big is None:
        print("no successful pipeline run")
        return
    p = ok[big]
    note = "" if big >= 1_000_000 else f" (NOT MEASURED at 1M: largest size run is {big:,})"
    e2e_1m = p["e2e_seconds"] if big == 1_000_000 else None
    print(f"- 1M extract→outbox <= {TARGET_1M_SECONDS:.0f} s: "
          + (f"{'MET' if e2e_1m <= TARGET_1M_SECONDS else 'NOT MET'} ({e2e_1m:.1f} s)" if e2e_1m is not None else "unknown" + note))
    nv = results[big].get("naive")
    if nv and "error" not in nv:
        sp = nv["seconds_at_n"] / p["e2e_seconds"]
        cpu_sp = nv["cpu_seconds"] * (big / nv["rows"]) / p["e2e_cpu_seconds"]
        print(f"- >= {TARGET_SPEEDUP:.0f}x faster than naive at {big:,}: {'MET' if sp >= TARGET_SPEEDUP else 'NOT MET'} "
              f"({sp:.1f}x wall{', naive extrapolated' if nv['extrapolated'] else ''}; {cpu_sp:.1f}x in CPU seconds)")
    rss = max(peak_rss(q) for q in ok.values())
    print(f"- peak RSS < {TARGET_RSS_MIB:.0f} MiB: {'MET' if rss < TARGET_RSS_MIB else 'NOT MET'} (max {rss:,.0f} MiB over sizes run)"
          + note)
    base = 100_000 if 100_000 in ok else min(ok)
    if big > base:
        a = ok[base]["e2e_seconds"] / base
        b = p["e2e_seconds"] / big
        ca, cb = ok[base]["e2e_cpu_seconds"] / base, p["e2e_cpu_seconds"] / big
        print(f"- linear cost: s/100k at {big:,} is {b / a:.2f}x the value at {base:,} (CPU s/100k: {cb / ca:.2f}x) "
              f"({'MET' if b / a <= LINEAR_TOLERANCE else 'NOT MET'}, tolerance {LINEAR_TOLERANCE}x; 10k is dominated by "
              f"fixed costs such as worker spawn and Great Expectations set-up)")
        worst = max(STEPS, key=lambda s: (p["steps"][s]["seconds"] / big) / max(ok[base]["steps"][s]["seconds"] / base, 1e-9))
        w = (p["steps"][worst]["seconds"] / big) / (ok[base]["steps"][worst]["seconds"] / base)
        print(f"  least linear step: {worst} ({w:.2f}x per contact at {big:,} vs {base:,})")
    else:
        print("- linear cost: needs at least two sizes >= 100k")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--database-url", default=None,
                    help="PostgreSQL server for the store (a new database per run, dropped after); default: SQLite")
    ap.add_argument("--store-url", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--naive-max", type=int, default=100_000, help="rows for the naive script (extrapolated above)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--flow-max", type=int, default=10_000,
                    help="run the real campaign flow under prefect_test_harness for sizes <= this (0 = never)")
    ap.add_argument("--no-flow-send", dest="flow_send", action="store_false",
                    help="with the real flow, skip the non-dry-run campaign (which sends to the local sandbox gateway)")
    ap.add_argument("--profile", action="store_true", help="cProfile each pipeline step (profile-*.txt in the temp dir)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="do not time the main functions inside each step")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    ap.add_argument("--workdir", default=None, help="parent of the temp dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--json", default=None, help="also write all raw results to this file")
    ap.add_argument("--report-from", default=None, metavar="JSON", help="only print the report of an earlier --json file")
    ap.add_argument("--_phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._phase:
        child_main(args)
        return
    if args.report_from:
        results = {int(k): v for k, v in json.loads(Path(args.report_from).read_text()).items()}
        print(f"# smsflow campaign benchmark (report of {args.report_from})")
        for n, r in results.items():
            report_size(n, r)
        summary(results)
        return
    print(f"# smsflow campaign benchmark  ({store_label(args.database_url)} store, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, "
          f"sizes {', '.join(f'{s:,}' for s in args.sizes)})")
    results: dict[int, dict] = {}
    for n in args.sizes:
        d = Path(tempfile.mkdtemp(prefix=f"smsflow-bench-{n}-", dir=args.workdir))
        log(f"n={n:,}: working in {d}")
        r: dict = {}
        r["gen"] = run_child("gen", n, d, args)
        if "error" not in r["gen"]:
            log(f"n={n:,}: demo CRM written in {r['gen']['seconds']:.1f}s")
            with fresh_store(args.database_url, d) as args.store_url:
                r["pipeline"] = run_child("pipeline", n, d, args)
            if not args.no_naive:
                r["naive"] = run_child("naive", n, d, args)
            if n <= args.flow_max:
                with fresh_store(args.database_url, d, "flowstore") as args.store_url:
                    r["flow"] = run_child("flow", n, d, args)
            args.store_url = None
        results[n] = r
        report_size(n, r)
        sys.stdout.flush()
        if args.keep or args.profile:
            print(f"(kept {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)
    summary(results, store_label(args.database_url))
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str, indent=1))
    failed = [n for n, r in results.items() if "error" in (r.get("pipeline") or {"error": "not run"})]
    if failed:
        raise SystemExit(f"the pipeline failed for {failed}")


if __name__ == "__main__":
    main()
