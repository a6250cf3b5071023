"""tasks/validate_csv.py: the `smsflow validate` command's CSV validator."""

from __future__ import annotations

import csv
import io

import pytest

from smsflow.exports import ExportFormat
from tasks.validate_csv import CSV_STATUSES, ValidationInputError, validate_csv


# ---------------------------------------------------------------------------
# validate_csv
# ---------------------------------------------------------------------------

CSV_IN = (
    "\ufeffid,name,phone,updated_at,note,note\n"
    "1,Анна,8 (916) 123-45-67,2025-01-01T10:00:00Z,\"a, b\",x\n"
    "2,Boris,+7 495 123-45-67,2025-01-01,NA,\n"
    "3,Vera,,2025-01-01,007,\n"
    "4,Gleb,+7 916 1234567,2025-06-01,,\n"
    "5,Dina,garbage,,\"multi\nline\",\n"
    "6,Egor,8-800-555-35-35,,null,\n"
    "7,Fedor,9161234567,2025-02-01,,\n"
    "8,Kazakh,+7 701 123 4567,,,\n"
)


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_validate_csv_roundtrip(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text(CSV_IN, encoding="utf-8")
    counts = validate_csv(src, dst)
    assert counts == {"ok": 2, "invalid": 1, "not_mobile": 2, "duplicate": 2, "missing": 1}
    out = _read(dst)
    original = list(csv.reader(io.StringIO(CSV_IN.lstrip("\ufeff"))))
    assert out[0] == original[0] + ["phone_e164", "phone_status", "reason", "duplicate_of"]
    assert len(out) == len(original)
    for o, i in zip(out[1:], original[1:]):
        assert o[: len(i)] == i  # every input column unchanged, rows in order
    extra = {row[0]: row[len(original[0]) :] for row in out[1:]}
    assert extra["1"] == ["+79161234567", "duplicate", "same number as row 3", "3"]
    assert extra["4"] == ["+79161234567", "ok", "", ""]  # latest updated_at
    assert extra["7"] == ["+79161234567", "duplicate", "same number as row 3", "3"]
    assert extra["2"] == ["+74951234567", "not_mobile", "fixed-line number cannot receive SMS", ""]
    assert extra["3"] == ["", "missing", "no phone number", ""]
    assert extra["5"][1] == "invalid" and extra["5"][2].startswith("could not parse")
    assert extra["6"][1:3] == ["not_mobile", "toll-free number cannot receive SMS"]
    assert extra["8"] == ["+77011234567", "ok", "", ""]


def test_validate_csv_first_row_kept_without_updated_at(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,tel\n1,89161234567\n2,+79161234567\n3,+77011234567\n", encoding="utf-8")
    counts = validate_csv(src, dst, phone_column="tel")
    assert counts["duplicate"] == 1
    assert [r[-1] for r in _read(dst)[1:]] == ["", "0", ""]


def test_validate_csv_default_region(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("phone\n8 701 123 4567\n07400 123456\n", encoding="utf-8")
    assert validate_csv(src, dst, default_region="GB")["ok"] == 1
    assert [r[1] for r in _read(dst)[1:]] == ["", "+447400123456"]


def test_validate_csv_header_only(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,name,phone\n", encoding="utf-8")
    assert validate_csv(src, dst) == dict.fromkeys(CSV_STATUSES, 0)
    assert _read(dst) == [["id", "name", "phone", "phone_e164", "phone_status", "reason", "duplicate_of"]]


def test_validate_csv_revalidate_output_is_idempotent(tmp_path):
    src, out1, out2 = tmp_path / "in.csv", tmp_path / "o1.csv", tmp_path / "o2.csv"
    src.write_text(CSV_IN, encoding="utf-8")
    c1 = validate_csv(src, out1)
    c2 = validate_csv(out1, out2)
    assert c1 == c2 and out1.read_bytes() == out2.read_bytes()


def test_validate_csv_missing_column_message(tmp_path):
    src = tmp_path / "IN.csv"
    src.write_text("id,name,tel\n1,a,89161234567\n", encoding="utf-8")
    with pytest.raises(ValidationInputError) as ei:
        validate_csv(src, tmp_path / "out.csv")
    assert str(ei.value) == f"column 'phone' not found in {src}; columns: id, name, tel"
    assert not (tmp_path / "out.csv").exists()


def test_validate_csv_file_errors(tmp_path):
    with pytest.raises(ValidationInputError, match="input file not found: .*nope.csv"):
        validate_csv(tmp_path / "nope.csv", tmp_path / "out.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="empty"):
        validate_csv(empty, tmp_path / "out.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("phone,name\n1,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(ValidationInputError, match="not valid utf-8.*--encoding"):
        validate_csv(latin, tmp_path / "out.csv", fmt=ExportFormat("csv", encoding="utf-8", delimiter=","))
    clash = tmp_path / "clash.csv"
    clash.write_text("phone,reason\n1,x\n", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="reason"):
        validate_csv(clash, tmp_path / "out.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("phone\n1\n", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="output directory does not exist"):
        validate_csv(ok, tmp_path / "missing_dir" / "out.csv")


