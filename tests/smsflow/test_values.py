"""smsflow/values.py: one reading of CRM yes/no values for extract, policy and the REST CRMs."""
import math

import pytest

from smsflow.values import truthy


@pytest.mark.parametrize("value", [True, 1, 2.5, "1", "true", "TRUE", " yes ", "Y", "да", "Да", "д", "on", "checked"])
def test_yes(value):
    assert truthy(value)


@pytest.mark.parametrize("value", [None, False, 0, 0.0, math.nan, "", "0", "false", "no", "нет", "off", "unchecked", "None"])
def test_no(value):
    assert not truthy(value)


def test_the_extract_reads_a_checkbox_export_as_consent(sqlite_engine, tmp_path):
    from tests.helpers import contact, load_csv, write_csv

    rows = [contact(0, sms_consent="checked"), contact(1, sms_consent="нет")]
    load_csv(sqlite_engine, write_csv(tmp_path / "crm.csv", rows))
    with sqlite_engine.connect() as c:
        from sqlalchemy import text

        got = dict(c.execute(text("SELECT crm_id, sms_consent FROM contacts")).fetchall())
    assert {k: bool(v) for k, v in got.items()} == {"C00000": True, "C00001": False}
