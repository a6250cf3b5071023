"""Distributed mode vs the single process, on the commands users run.

    python bench/cluster.py --contacts 1000000 [--shard-size 200000] --workers 1 3 \
        [--database-url postgresql+psycopg://postgres@127.0.0.1/postgres]

For the same demo export (write_crm_csv) and a fresh PostgreSQL store each time:
1. the single-process run: `smsflow campaign` in embedded mode (its temporary Prefect API);
2. for each worker count: `scripts/cluster.sh start` (PostgreSQL-backed Prefect server, W process workers,
   Dask scheduler + --dask-workers), `smsflow campaign` in distributed mode, `scripts/cluster.sh stop`.
The campaign sends everything (sandbox gateway, unthrottled, clock in the marketing window) and waits for no
receipts. Printed: wall, CPU seconds (the command and every cluster process; PostgreSQL excluded), WAL bytes
(pg_current_wal_lsn before/after: the store AND the Prefect server's database), flow and task runs, the
per-shard orchestration overhead (a render-shard run from Pending to Completed minus its render task), and
a sizing table computed from them (labelled as computed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cli import run_cli  # noqa: E402 - after the path
from bench.stores import fresh_store  # noqa: E402
from smsflow.settings import Settings  # noqa: E402

NOW = "2026-12-08T09:00:00+00:00"  # Tuesday 12:00 Moscow: inside the marketing window
TEMPLATE = ROOT / "templates" / "demo_promo.yaml"


def _env(d: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SMSFLOW_", "CLUSTER_"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", SMSFLOW_DATA_DIR=str(d / "data"),
               PREFECT_HOME=str(d / "home"), PREFECT_LOGGING_LEVEL="WARNING", **extra)
    return env


def _wal(admin_url: str) -> int:
    import psycopg

    url = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as c:
        return int(c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])


def _tree_cpu(roots: list[int]) -> float:
    """CPU seconds of the processes under ``roots`` (their own and their reaped children's)."""
    import psutil

    total = 0.0
    for r in roots:
        try:
            procs = [psutil.Process(r)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


def _campaign_args(export: Path, name: str) -> list[str]:
    return ["campaign", "--source", str(export), "--template", str(TEMPLATE), "--name", name, "--now", NOW,
            "--rate", "1000000", "--wait", "0"]


def single(export: Path, base_url: str, d: Path) -> dict:
    with fresh_store(base_url, d, "single") as store:
        env = _env(d / "single", SMSFLOW_DATABASE_URL=store)
        w0 = _wal(base_url)
        r = run_cli(_campaign_args(export, "bench"), env, d, timeout=3600)
        r["wal"] = _wal(base_url) - w0
    if r["rc"] != 0:
        raise SystemExit(f"single-process run failed:\n{r['stderr'][-3000:]}")
    return r


def _runs(api: str) -> dict:
    import httpx

    def every(path: str) -> list[dict]:  # the API answers at most 200 per call
        out: list[dict] = []
        while True:
            page = httpx.post(f"{api}/{path}/filter", json={"limit": 200, "offset": len(out)})
            page.raise_for_status()
            out += page.json()
            if len(page.json()) < 200:
                return out

    flows = {f["id"]: f["name"] for f in every("flows")}
    frs, trs = every("flow_runs"), every("task_runs")
    overhead = []
    for fr in frs:
        if flows.get(fr["flow_id"]) != "render-shard" or fr["state_type"] != "COMPLETED":
            continue
        states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": fr["id"]}).json()
        pending = min(datetime.fromisoformat(s["timestamp"]) for s in states if s["type"] == "PENDING")
        end = datetime.fromisoformat(fr["end_time"])
        task = [t for t in trs if t["flow_run_id"] == fr["id"] and t["end_time"]]
        busy = sum((datetime.fromisoformat(t["end_time"]) - datetime.fromisoformat(t["start_time"])).total_seconds()
                   for t in task)
        overhead.append((end - pending).total_seconds() - busy)
    by_task: dict[str, int] = {}
    for t in trs:
        by_task[t["name"].rsplit("-", 1)[0]] = by_task.get(t["name"].rsplit("-", 1)[0], 0) + 1
    return {"flow_runs": len(frs), "task_runs": len(trs), "shard_overhead": sorted(overhead), "by_task": by_task,
            "by_flow": {n: sum(1 for f in frs if flows.get(f["flow_id"]) == n) for n in set(flows.values())}}


def distributed(export: Path, base_url: str, d: Path, workers: int, dask_workers: int, shard_size: int) -> dict:
    from smsflow.processes import free_ports

    pport, dport = free_ports(2)
    cdir = d / f"cluster-{workers}"
    pdb = f"bench_prefect_{uuid.uuid4().hex[:8]}"
    with fresh_store(base_url, d, f"dist{workers}") as store:
        env = _env(d / f"dist-{workers}", CLUSTER_DIR=str(cdir), CLUSTER_PREFECT_PORT=str(pport),
                   CLUSTER_DASK_PORT=str(dport), CLUSTER_PREFECT_DB=pdb, CLUSTER_WORKERS=str(workers),
                   CLUSTER_DASK_WORKERS=str(dask_workers), SMSFLOW_DATABASE_URL=store,
                   PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
        try:
            t0 = time.perf_counter()
            res = subprocess.run(["bash", "scripts/cluster.sh", "start"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
            if res.returncode:
                raise SystemExit(f"cluster start failed:\n{res.stderr[-3000:]}")
            start_s = time.perf_counter() - t0
            client = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines()
                          if line.startswith("export "))
            roots = [int(p.read_text()) for p in cdir.glob("*.pid")]
            cpu0, w0 = _tree_cpu(roots), _wal(base_url)
            r = run_cli(_campaign_args(export, "bench"), {**env, **client, "SMSFLOW_SHARD_SIZE": str(shard_size)}, d,
                        timeout=3600)
            r["wal"] = _wal(base_url) - w0
            r["cluster_cpu"] = _tree_cpu(roots) - cpu0
            r["cluster_start_s"] = start_s
            if r["rc"] != 0:
                raise SystemExit(f"distributed run failed:\n{r['stderr'][-3000:]}")
            r.update(_runs(client["PREFECT_API_URL"]))
        finally:
            subprocess.run(["bash", "scripts/cluster.sh", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)
            import psycopg

            with psycopg.connect(base_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{pdb}" WITH (FORCE)')
    return r


def _p95(xs: list[float]) -> float:
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contacts", type=int, default=200_000)
    ap.add_argument("--shard-size", type=int, default=Settings.model_fields["shard_size"].default,
                    help="contacts per render shard (default: the product's, SMSFLOW_SHARD_SIZE)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--dask-workers", type=int, default=2)
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--json", default=None)
    ap.add_argument("--single-wall", type=float, default=None,
                    help="skip the single-process run; compare with this wall time measured before")
    args = ap.parse_args(argv)
    from smsflow.demo_crm import write_crm_csv

    d = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    export = d / "export.csv"
    write_crm_csv(export, args.contacts, seed=42)
    out = {"contacts": args.contacts, "shard_size": args.shard_size}
    if args.single_wall:  # measured before on the same export (same --contacts and seed)
        s = {"wall": args.single_wall, "cpu": float("nan"), "wal": float("nan"),
             "summary": {"sent": 0, "planned": 0}}
    else:
        s = single(export, args.database_url, d)
    sent = s["summary"].get("sent", 0)
    out["single"] = {k: s[k] for k in ("wall", "cpu", "wal")} | {"sent": sent, "planned": s["summary"]["planned"]}
    print(f"single process (embedded): {s['wall']:.1f} s wall, {s['cpu']:.1f} CPU s, {s['wal'] / 1e6:.1f} MB WAL, "
          f"{s['summary']['planned']} planned, {sent} sent", flush=True)
    for w in args.workers:
        r = distributed(export, args.database_url, d, w, args.dask_workers, args.shard_size)
        oh = r["shard_overhead"]
        cpu = r["cpu"] + r["cluster_cpu"]
        per_m = (r["flow_runs"] + r["task_runs"]) * 1_000_000 / args.contacts
        # runs that grow with the campaign: a flow and a task run per render shard, a task run per 50,000 sent
        variable = 2 * r["by_flow"].get("render-shard", 0) + r["by_task"].get("send-batch", 0)
        out[f"workers_{w}"] = {"wall": r["wall"], "cpu": cpu, "wal": r["wal"], "flow_runs": r["flow_runs"],
                               "task_runs": r["task_runs"], "runs_per_1m": per_m, "by_flow": r["by_flow"],
                               "by_task": r["by_task"], "fixed_runs": r["flow_runs"] + r["task_runs"] - variable,
                               "variable_runs": variable,
                               "shard_overhead_median": statistics.median(oh) if oh else None,
                               "shard_overhead_p95": _p95(oh), "cluster_start_s": r["cluster_start_s"],
                               "planned": r["summary"]["planned"], "sent": r["summary"].get("sent", 0)}
        print(f"distributed, {w} worker(s), {args.dask_workers} Dask worker(s): {r['wall']:.1f} s wall "
              f"({r['wall'] / s['wall']:.2f}x the single process), {cpu:.1f} CPU s "
              f"({cpu / args.contacts * 1000:.3f} ms/contact), {r['wal'] / 1e6:.1f} MB WAL "
              f"({r['wal'] / max(1, r['summary'].get('sent', 0)):.0f} B/message sent), {r['flow_runs']} flow + "
              f"{r['task_runs']} task runs ({per_m:.0f} per 1M contacts), shard overhead median "
              f"{out[f'workers_{w}']['shard_overhead_median']:.2f} s, p95 {_p95(oh):.2f} s", flush=True)
    last = out[f"workers_{args.workers[-1]}"]
    cpu_per_contact = last["cpu"] / args.contacts
    wal_per_msg = last["wal"] / max(1, last["sent"])
    sent_share = last["sent"] / args.contacts  # messages sent per contact of the export
    print("\nSizing (computed from the last run, not measured):")
    print(f"(CPU and WAL per contact of the export, {sent_share:.0%} of whom got a message; runs: "
          f"{last['fixed_runs']} per campaign + {last['variable_runs']} per {args.contacts:,} contacts)")
    print("| load | CPU | cores for a 1 h window | WAL | flow + task runs |")
    print("|---|---:|---:|---:|---:|")
    for label, n in (("10M contacts", 10_000_000), ("100M contacts", 100_000_000)):
        cpu_h = cpu_per_contact * n / 3600
        runs = last["fixed_runs"] + last["variable_runs"] * n / args.contacts
        print(f"| {label} | {cpu_h:.1f} CPU h | {cpu_h:.1f} | {wal_per_msg * sent_share * n / 1e9:.0f} GB "
              f"| {runs:.0f} |")
    print(f"| 10,000 msg/s | {cpu_per_contact * 10_000:.1f} cores | - | {wal_per_msg * 10_000 / 1e6:.1f} MB/s | "
          f"- |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
