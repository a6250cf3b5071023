"""Erasure: the person is gone from every table; a later import cannot message them."""
from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import text

from blocks.gateway import SandboxGateway
from store.db import utcnow
from tasks.erasure import forget
from tasks.inbound import store_and_apply
from tasks.render import plan_messages
from tasks.policy import always_open
from tasks.segment import ALL, build_membership
from smsflow.ratelimit import TokenBucket
from tasks.send import send_messages
from tests.helpers import DAYTIME, contact, load_csv, write_csv
from tests.pipeline import TPL


def _everything(engine, needle: str) -> list[str]:
    """Every table and column that still holds ``needle``."""
    from sqlalchemy import inspect

    found = []
    insp = inspect(engine)
    columns = [(t, col["name"]) for t in insp.get_table_names() for col in insp.get_columns(t)]
    with engine.begin() as c:
        for t, n in columns:
            q = f"SELECT COUNT(*) FROM {t} WHERE CAST({n} AS TEXT) LIKE :x"
            if c.execute(text(q), {"x": f"%{needle}%"}).scalar():
                found.append(f"{t}.{n}")
    return found


def test_forget_removes_the_person_everywhere_and_blocks_reimport(engine, tmp_path):
    from tasks.accounting import ensure_campaign

    rows = [contact(i) for i in range(5)]
    rows[2]["phone"] = "8 (916) 555-44-33"
    path = write_csv(tmp_path / "crm.csv", rows)
    load_csv(engine, path)
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="c", source="test", segment="all", template_name="promo", kind="marketing",
                          gateway="sandbox", price_per_segment=1, policy=always_open().model_dump(mode="json"))
    plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=1, gateway="sandbox")
    gw = SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), rejected_rate=0, batch_size=2)
    send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(1000), claimer="a", max_messages=2, now=DAYTIME)
    with engine.begin() as c:
        store_and_apply(c, gateway="kannel", gateway_message_id="mo1", from_e164="+79165554433", to=None,
                        body="Когда скидки?", raw={"from": "+79165554433"})
    assert _everything(engine, "9165554433")  # the number is in several tables now
    res = forget(engine, "+7 916 555-44-33")
    assert res.contacts == 1 and res.messages == 1 and res.inbound == 1 and res.suppressed_numbers == 1
    assert _everything(engine, "9165554433") == []
    assert _everything(engine, "C00002") == []
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM suppression_list")).scalar() == 1
        assert c.execute(text("SELECT state FROM outbox WHERE contact_id IS NULL")).scalar() in ("rejected", "submitted")
    # the CRM still has them: a re-import must not make them reachable again
    write_csv(path, rows[:2] + [dict(rows[2], updated_at="2027-01-01T00:00:00Z")] + rows[3:])
    load_csv(engine, path)
    with engine.begin() as c:
        st = c.execute(text("SELECT status, status_reason FROM contacts WHERE crm_id = 'C00002'")).one()
    assert st[0] == "quarantined" and "suppression" in st[1]


def test_forget_by_crm_id_and_cli_logs_no_number(tmp_path, monkeypatch):
    from store.db import dispose_engines, get_engine

    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(3)])
    load_csv(get_engine(), path)
    dispose_engines()
    res = subprocess.run([sys.executable, "-m", "smsflow.cli", "forget", "C00001"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["contacts"] == 1
    assert "9161000001" not in res.stdout + res.stderr
    with get_engine().begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM contacts")).scalar() == 2
        payload = c.execute(text("SELECT payload FROM event_log WHERE kind = 'privacy.erased'")).scalar()
    assert "9161000001" not in str(payload)
