"""Orders from a CSV/XLSX export (CsvCrm.orders_path, `smsflow orders`), on both stores."""
from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import text

from blocks.crm import CsvCrm
from tasks.orders import extract_orders
from tests.helpers import contact, load_csv, write_csv

ORDERS = ("order_id;contact_id;amount;status;ordered_at;комментарий\n"
          "O-1;C00001;2500.00;paid;2026-03-03 10:00:00;доставка курьером\n"
          "O-2;C00002;1200.50;paid;2026-03-04T12:00:00+03:00;самовывоз\n"
          "O-3;C00002;900;refunded;2026-03-05 09:00:00;возврат\n"
          "O-4;C00003;;paid;2026-03-05 09:00:00;\n"
          "O-5;C09999;300;paid;2026-03-06 09:00:00;\n")


def _orders(tmp_path, body=ORDERS):
    p = tmp_path / "orders.csv"
    p.write_bytes(body.encode("cp1251"))  # Russian Excel: cp1251, ';'
    return p


def test_orders_from_an_export_are_read_linked_and_quarantined(engine, tmp_path):
    crm = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(5)])
    load_csv(engine, crm)
    src = CsvCrm(path=str(crm), source_name="test", orders_path=str(_orders(tmp_path)))
    res = extract_orders(engine, src)
    assert (res.rows, res.stored, res.quarantined) == (5, 4, 1)  # O-4 has no amount
    with engine.begin() as c:
        rows = {r[0]: r[1:] for r in c.execute(text(
            "SELECT o.crm_order_id, o.amount, o.revenue, k.crm_id FROM orders o LEFT JOIN contacts k "
            "ON k.id = o.contact_id ORDER BY 1"))}
        q = c.execute(text("SELECT row_key, reason FROM quarantine WHERE step = 'orders'")).all()
    assert rows["O-1"][0] == 2500.0 and bool(rows["O-1"][1]) and rows["O-1"][2] == "C00001"
    assert not bool(rows["O-3"][1])  # a refund is not revenue
    assert rows["O-5"][2] is None  # a contact not (yet) known: kept, linked when it arrives
    assert q == [("O-4", "order without a valid amount")]
    # the export again, with O-1 refunded meanwhile: revenue off, nothing duplicated
    extract_orders(engine, src.model_copy(update={"orders_path": str(_orders(
        tmp_path, ORDERS.replace("O-1;C00001;2500.00;paid", "O-1;C00001;2500.00;refunded")))}))
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*), SUM(CASE WHEN revenue THEN 1 ELSE 0 END) FROM orders")).one() == (4, 2)


def test_smsflow_orders_reads_an_export_for_the_contacts_export_campaigns_ran_on(tmp_path):
    import os

    crm = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(5)])
    tpl = tmp_path / "t.txt"
    tpl.write_text("Привет {{ first_name }}", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "SMSFLOW_"))}
    env.update(SMSFLOW_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "home"))
    run = [sys.executable, "-m", "smsflow.cli"]
    r = subprocess.run([*run, "campaign", "--source-csv", str(crm), "--template", str(tpl), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*run, "orders", "--source", str(crm), "--orders", str(_orders(tmp_path))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"rows": 5, "stored": 4, "quarantined": 1}
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "smsflow.sqlite")
    assert db.execute("SELECT COUNT(*) FROM orders WHERE contact_id IS NOT NULL").fetchone()[0] == 3
    r = subprocess.run([*run, "orders", "--source", str(crm), "--orders", str(tmp_path / "missing.csv")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "file not found" in r.stderr
    r = subprocess.run([*run, "campaign", "--source-csv", str(crm), "--template", str(tpl), "--attribution-days", "0:3"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--attribution-days '0:3'" in r.stderr and r.stdout == ""
