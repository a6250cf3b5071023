"""Benchmark: the command a data team runs, ``smsflow campaign --source-csv EXPORT --dry-run``, vs a naive script.

This is a benchmark, not a test: it prints numbers.

    . .venv/bin/activate
    python bench/cli.py                                   # sizes 1000 300000
    python bench/cli.py --sizes 1000 100000 1000000
    python bench/cli.py --sizes 100000 --database-url postgresql+psycopg://root@127.0.0.1/postgres

For every size N, in a fresh temp dir:

1. the demo CRM's contacts (``smsflow.demo_crm``, seed 42: messy phone formats, duplicates, consent
   mixed, Russian and English names) are written as a CRM *export*: cp1251, ';'-separated, as Excel
   in a Russian locale saves it (``--export utf8`` for UTF-8 with commas), and as a SQLite CRM;
2. the real command runs as a user runs it, in a child process with its own environment: a new store
   (SQLite file, or a new database on the PostgreSQL server of ``--database-url``), no Prefect server
   configured (``PREFECT_API_URL`` unset) unless ``--prefect-api-url`` is given. Wall time, CPU seconds
   (user+sys of the command and all its children) and peak RSS of the process tree are measured;
3. the NAIVE per-row script of ``bench/campaign.py`` (phonenumbers + Jinja2 + ORM adds one by one) runs on
   the same contacts in the same run (capped by ``--naive-max`` rows, extrapolated linearly above).

The command's JSON summary is checked (planned > 0 and planned + held back accounts for the rows).
At the end a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.campaign import TreeRss, log, run_child  # noqa: E402 - after the path
from bench.stores import fresh_store, store_label  # noqa: E402

TEMPLATE = ROOT / "templates" / "demo_promo.yaml"
SEED = 42


def write_export(n: int, d: Path, kind: str) -> Path:
    """The demo contacts as a CRM export (cp1251 + ';' like a Russian Excel, or UTF-8 + ',')."""
    from smsflow.demo_crm import write_crm_csv

    utf8 = d / "export-utf8.csv"
    write_crm_csv(utf8, n, seed=SEED)
    if kind == "utf8":
        return utf8
    out = d / "export.csv"
    import csv

    with open(utf8, encoding="utf-8", newline="") as src, open(out, "w", encoding="cp1251", errors="replace",
                                                                 newline="") as dst:
        w = csv.writer(dst, delimiter=";", lineterminator="\r\n")
        for row in csv.reader(src):
            w.writerow(row)
    utf8.unlink()
    return out


def run_cli(args_: list[str], env: dict, cwd: Path, timeout: float) -> dict:
    """Run ``smsflow ...`` as a user does; wall, CPU of the whole tree, peak RSS of the tree, its JSON line."""
    exe = Path(sys.executable).with_name("smsflow")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "smsflow.cli"]), *args_]
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeRss(root=proc.pid)
    sampler.start()
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        out = proc.stdout.read()
        rc = proc.wait(timeout=timeout)
    finally:
        sampler.stop()
        peak = sampler.peak_kib / 1024
    wall = time.perf_counter() - t0
    reader.join(5)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    summary = None
    for line in out.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return {"rc": rc, "wall": wall, "cpu": cpu, "peak_rss_mib": peak, "summary": summary,
            "stderr": "".join(err_lines), "peak_at": sampler.peak_at,
            "peak_by_process": [(what, round(kib / 1024)) for _, what, kib in sampler.peak_detail]}


def bench_size(n: int, args) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"bench-cli-{n}-", dir=args.workdir))
    res: dict = {"n": n}
    try:
        t = time.perf_counter()
        export = write_export(n, d, args.export)
        res["export_mib"] = export.stat().st_size / 2**20
        log(f"n={n:,}: export {export.name} ({res['export_mib']:.1f} MiB) in {time.perf_counter() - t:.1f}s")
        if not args.no_naive:
            res["gen"] = run_child("gen", n, d, args)  # crm.sqlite: the SQL source and the naive script's input
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SMSFLOW_"))}
        env.update(DO_NOT_TRACK="1", SMSFLOW_DATA_DIR=str(d / "data"))
        if args.prefect_api_url:
            env["PREFECT_API_URL"] = args.prefect_api_url
        with fresh_store(args.database_url, d) as url:
            env["SMSFLOW_DATABASE_URL"] = url
            cli = ["campaign", "--source-csv", str(export), "--template", str(TEMPLATE), "--dry-run",
                   "--name", f"bench-{n}"]
            log(f"n={n:,}: smsflow {' '.join(cli[:1])} ... --dry-run on {url.split(':')[0]} ...")
            r = run_cli(cli, env, d, args.timeout)
        res["cli"] = {k: v for k, v in r.items() if k != "stderr"}
        if r["rc"] != 0 or not r["summary"]:
            log(f"n={n:,}: the command failed (rc={r['rc']}):\n{r['stderr'][-3000:]}")
        else:
            s = r["summary"]
            log(f"n={n:,}: {r['wall']:.2f}s wall, {r['cpu']:.1f} CPU s, peak {r['peak_rss_mib']:.0f} MiB; "
                f"planned {s.get('planned')}, parts {s.get('parts')}, cost {s.get('cost_planned')} {s.get('currency')}")
            if args.verbose:
                sys.stderr.write(r["stderr"])
                log(f"n={n:,}: peak at {r['peak_at']:.1f}s: "
                    + ", ".join(f"{what} {mib} MiB" for what, mib in r["peak_by_process"]))
        if not args.no_naive:
            res["naive"] = run_child("naive", n, d, args)
            nv = res["naive"] or {}
            if "seconds_at_n" in nv:
                log(f"n={n:,}: naive {nv['seconds_at_n']:.2f}s" + (" (extrapolated)" if nv.get("extrapolated") else ""))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    return res


def table(results: list[dict], store: str) -> str:
    lines = [f"| `smsflow campaign --dry-run`, CRM export ({store}) | wall | CPU s | peak RSS | naive script | vs naive |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.get("cli") or {}
        nv = (r.get("naive") or {}).get("seconds_at_n")
        ratio = f"{nv / c['wall']:.2f}x" if nv and c.get("wall") and c.get("rc") == 0 else "-"
        wall = f"{c['wall']:.2f} s" if c.get("rc") == 0 else f"failed (rc {c.get('rc')})"
        lines.append(f"| {r['n']:,} contacts | {wall} | {c.get('cpu', 0):.1f} | {c.get('peak_rss_mib', 0):.0f} MiB | "
                     f"{f'{nv:.2f} s' if nv else '-'} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 300_000])
    ap.add_argument("--database-url", default=None,
                    help="a PostgreSQL server (a new database is created per run and dropped); default: SQLite")
    ap.add_argument("--export", choices=("cp1251", "utf8"), default="cp1251")
    ap.add_argument("--prefect-api-url", default=None, help="run against this Prefect server (default: none)")
    ap.add_argument("--naive-max", type=int, default=300_000, help="rows for the naive script (extrapolated above)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the command's stderr")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    args = ap.parse_args(argv)
    # run_child (bench/campaign.py's phases) reads these
    args.profile, args.breakdown, args.flow_send = False, False, False
    results = [bench_size(n, args) for n in args.sizes]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(table(results, store_label(args.database_url)))
    failed = [r["n"] for r in results if (r.get("cli") or {}).get("rc") != 0]
    if failed:
        raise SystemExit(f"the command failed for {failed}")


if __name__ == "__main__":
    main()
