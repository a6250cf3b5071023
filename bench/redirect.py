"""The short-link redirect as phones hit it: `smsflow serve` (the real command) and a bounded async load.

    python bench/redirect.py [--links 100000] [--seconds 20] [--concurrency 64] [--database-url URL]

A fresh store gets ``--links`` short links; `smsflow serve` starts on a free port (a child process, as
users start it); a load generator process keeps ``--concurrency`` requests in flight (httpx, keep-alive,
a phone's user agent, random known codes) for ``--seconds``. Printed: requests/s, p50/p90/p99 latency,
non-302 answers, and whether the store holds exactly one click per 302 the generator received (none
lost, none extra). Both run on this machine's cores (2 in CI), so the generator's CPU counts against it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stores import fresh_store, store_label  # noqa: E402

PHONE_UA = ("Mozilla/5.0 (Linux; Android 14; SM-A546B) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0.0.0 Mobile Safari/537.36")


def seed_links(url: str, n: int) -> list[str]:
    from smsflow.links import new_code
    from store.db import bulk_insert, get_engine, utcnow

    engine = get_engine(url)
    now = utcnow()
    codes = list({new_code() for _ in range(n)})
    with engine.begin() as c:
        bulk_insert(c, "short_links", ("code", "campaign_id", "contact_id", "outbox_key", "target", "created_at",
                                       "expires_at"),
                    [(code, 1, i, f"c1:{i}:sale", f"https://shop.example/sale?i={i}&utm_source=sms", now,
                      now + timedelta(days=90)) for i, code in enumerate(codes)])
    return codes


def _generate(base: str, codes: list[str], seconds: float, concurrency: int, out) -> None:
    import httpx

    async def main():
        lat: list[float] = []
        statuses: dict[int, int] = {}
        stop = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30,
                                     headers={"User-Agent": PHONE_UA}) as client:
            async def one():
                rnd = random.Random()
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    try:
                        r = await client.get(f"/{rnd.choice(codes)}")
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    except httpx.HTTPError:
                        statuses[-1] = statuses.get(-1, 0) + 1
                        continue
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
        out.put({"latencies": lat, "statuses": statuses, "wall": wall})

    asyncio.run(main())


def run(args) -> dict:
    from smsflow.processes import free_ports

    d = Path(tempfile.mkdtemp(prefix="bench-redirect-"))
    with fresh_store(args.database_url, d) as url:
        codes = seed_links(url, args.links)
        (port,) = free_ports(1)
        env = {**os.environ, "SMSFLOW_DATABASE_URL": url, "SMSFLOW_DATA_DIR": str(d / "data"),
               "PREFECT_HOME": str(d / "home"), "SMSFLOW_CLICK_COMMIT": args.click_commit}
        exe = Path(sys.executable).with_name("smsflow")
        server = subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, cwd=d,
                                  stdout=subprocess.DEVNULL, stderr=open(d / "serve.log", "wb"))
        try:
            import httpx

            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            if args.tool == "wrk":
                res = _wrk(base, codes, args, d)
            else:
                q: mp.Queue = mp.get_context("spawn").Queue()
                gen = mp.get_context("spawn").Process(target=_generate, args=(base, codes, args.seconds,
                                                                               args.concurrency, q))
                gen.start()
                res = q.get(timeout=args.seconds + 120)
                gen.join(30)
        finally:
            server.terminate()
            server.wait(30)
        from sqlalchemy import text

        from store.db import dispose_engines, get_engine

        with get_engine(url).connect() as c:
            stored = c.execute(text("SELECT COUNT(*) FROM clicks")).scalar()
        dispose_engines()
    if args.tool == "wrk":
        return {"store": store_label(args.database_url), **res, "clicks_stored": stored,
                "concurrency": args.concurrency, "tool": "wrk"}
    lat = sorted(res["latencies"])
    ok = res["statuses"].get(302, 0)
    q = statistics.quantiles(lat, n=100)
    return {"store": store_label(args.database_url), "requests": len(lat), "rps": len(lat) / res["wall"],
            "p50_ms": q[49] * 1000, "p90_ms": q[89] * 1000, "p99_ms": q[98] * 1000, "statuses": res["statuses"],
            "redirects": ok, "clicks_stored": stored, "concurrency": args.concurrency, "tool": "httpx"}


LUA = """
local codes = {}
for line in io.lines(os.getenv("CODES")) do codes[#codes + 1] = line end
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/" .. codes[math.random(#codes)], {["User-Agent"] = os.getenv("UA")})
end
"""


def _wrk(base: str, codes: list[str], args, d: Path) -> dict:
    """wrk (C, one thread: the other core is the server's) with random known codes; its own percentiles."""
    import re

    (d / "codes.txt").write_text("\n".join(codes) + "\n")
    (d / "random.lua").write_text(LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{args.concurrency}", f"-d{int(args.seconds)}s", "--latency", "-s",
                          str(d / "random.lua"), base], capture_output=True, text=True,
                         env={**os.environ, "CODES": str(d / "codes.txt"), "UA": PHONE_UA},
                         timeout=args.seconds + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50"), "p90_ms": ms("90"), "p99_ms": ms("99"),
            "statuses": {"other": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else ""},
            "redirects": total - (int(bad.group(1)) if bad else 0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--tool", choices=("wrk", "httpx"), default="wrk" if shutil.which("wrk") else "httpx",
                    help="load generator: wrk (Debian package, C) or a bounded httpx loop (default: wrk if installed)")
    ap.add_argument("--click-commit", choices=("sync", "async"), default="sync",
                    help="SMSFLOW_CLICK_COMMIT of the service (PostgreSQL: async does not wait for the WAL flush)")
    args = ap.parse_args(argv)
    r = run(args)
    print(f"{r['store']} (click commit {args.click_commit}): {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms at {r['concurrency']} in flight; answers {r['statuses']}; "
          f"clicks stored {r['clicks_stored']} for {r['redirects']} redirects")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
