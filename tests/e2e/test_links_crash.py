"""kill -9 of `smsflow serve` (the real command) under a stream of clicks: every redirect a phone got
has its click in the store (stored and committed before the 302), on SQLite and PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import text

from smsflow.processes import free_ports
from store.db import bulk_insert, get_engine, utcnow

REPO = Path(__file__).resolve().parents[2]
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1"


def test_clicks_survive_kill_9_of_the_service(any_store, tmp_path):
    engine = get_engine(any_store)
    now = utcnow()
    codes = [f"Ab3De{a}{b}" for a in "23456789" for b in "abcdefgh"]
    with engine.begin() as c:
        bulk_insert(c, "short_links", ("code", "campaign_id", "contact_id", "outbox_key", "target", "created_at",
                                       "expires_at"),
                    [(code, 1, i, f"c1:{i}:s", "https://shop.example/", now, now + timedelta(days=90))
                     for i, code in enumerate(codes)])
    (port,) = free_ports(1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SMSFLOW_")}, "SMSFLOW_DATABASE_URL": any_store,
           "SMSFLOW_DATA_DIR": str(tmp_path / "data"), "PREFECT_HOME": str(tmp_path / "home")}
    serve = subprocess.Popen([str(REPO / ".venv/bin/smsflow"), "serve", "--port", str(port)], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        redirected: list[str] = []
        stop = threading.Event()

        def clicker(offset: int) -> None:
            with httpx.Client(base_url=base, timeout=5, headers={"User-Agent": UA}) as client:
                i = offset
                while not stop.is_set():
                    code = codes[i % len(codes)]
                    i += 7
                    try:
                        if client.get(f"/{code}").status_code == 302:
                            redirected.append(code)
                    except httpx.HTTPError:
                        if stop.is_set() or serve.poll() is not None:
                            return

        threads = [threading.Thread(target=clicker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        while len(redirected) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(serve.pid, signal.SIGKILL)  # mid-stream
        serve.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    assert len(redirected) >= 300
    with engine.connect() as c:
        stored = dict(c.execute(text("SELECT code, COUNT(*) FROM clicks GROUP BY code")).all())
    got: dict[str, int] = {}
    for code in redirected:
        got[code] = got.get(code, 0) + 1
    lost = {code: n - stored.get(code, 0) for code, n in got.items() if stored.get(code, 0) < n}
    assert not lost, f"redirects without a stored click: {lost}"
