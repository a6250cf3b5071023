"""smsflow/exports.py: CRM exports as data teams have them (Russian Excel/1C CSV, UTF-16, XLSX)."""
from __future__ import annotations

import codecs

import pandas as pd
import pytest

from smsflow.exports import (ExportError, ExportFormat, delimiter_option, detect_delimiter, encoding_option,
                             missing_columns_hint, read_export, read_header, sniff)

HEADER = ["id", "first_name", "last_name", "phone", "sms_consent", "city"]
ROWS = [[f"C{i}", ["Ёжик", "Анна", "Пётр", "Жанна"][i % 4], "Иванова-Щукина", f"+7 (916) 123-45-{i:02d}", "да",
         "Санкт-Петербург, Невский пр."] for i in range(40)]


def _csv_text(delimiter: str, rows=ROWS, header=HEADER) -> str:
    def cell(v: str) -> str:
        return f'"{v}"' if delimiter in v or '"' in v else v

    return "".join(delimiter.join(cell(v) for v in r) + "\r\n" for r in [header, *rows])


@pytest.mark.parametrize("encoding", ["cp1251", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "koi8-r", "cp866"])
@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_encoding_and_delimiter_are_detected(tmp_path, encoding, delimiter):
    path = tmp_path / "export.csv"
    path.write_bytes(_csv_text(delimiter).encode(encoding))
    fmt = sniff(path)
    assert fmt.delimiter == delimiter and fmt.detected == ("encoding", "delimiter")
    assert codecs.lookup(fmt.encoding).name == codecs.lookup({"utf-8": "utf-8-sig"}.get(encoding, encoding)).name
    df = read_export(path, fmt)
    assert list(df.columns) == HEADER
    assert df.values.tolist() == ROWS  # every value intact, commas inside quoted cells included
    assert ("detected" in fmt.describe()) and (fmt.describe().startswith("CSV, encoding "))


def test_a_two_line_cp1251_export_is_read_as_cp1251(tmp_path):
    """Short samples decode equally well in several code pages: the Russian default wins."""
    path = tmp_path / "short.csv"
    path.write_bytes("id;phone;first_name\n1;89161234567;Иван\n".encode("cp1251"))
    df = read_export(path)
    assert df.iloc[0].tolist() == ["1", "89161234567", "Иван"]


def test_western_code_page(tmp_path):
    path = tmp_path / "fr.csv"
    path.write_bytes("id;phone;first_name\n1;+33 6 12 34 56 78;Hélène\n2;+33 6 12 34 56 79;José Núñez\n".encode("cp1252"))
    assert read_export(path)["first_name"].tolist() == ["Hélène", "José Núñez"]


def test_given_options_win_and_wrong_ones_fail_clearly(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(_csv_text(";").encode("cp1251"))
    fmt = sniff(path, encoding="cp1251", delimiter=";")
    assert fmt.detected == () and "detected" not in fmt.describe()
    with pytest.raises(ExportError, match=r"x.csv is not valid utf-8 .*--encoding"):
        read_export(path, ExportFormat("csv", encoding="utf-8-sig", delimiter=";"))
    wrong = read_header(path, ExportFormat("csv", encoding="cp1251", delimiter=","))
    assert len(wrong) == 1 and "--delimiter ';'" in missing_columns_hint(wrong)


@pytest.mark.parametrize("text,expected", [("tab", "\t"), ("\\t", "\t"), (";", ";"), ("auto", None), ("", None),
                                           (None, None), ("semicolon", ";")])
def test_delimiter_option(text, expected):
    assert delimiter_option(text) == expected


def test_option_errors():
    with pytest.raises(ExportError, match="one character"):
        delimiter_option(";;")
    with pytest.raises(ExportError, match="unknown encoding"):
        encoding_option("windows-9999")
    assert encoding_option("windows-1251") == "cp1251" and encoding_option("UTF8") == "utf-8-sig"


def test_single_column_file_defaults_to_comma():
    assert detect_delimiter("phone\n89161234567\n89161234568\n") == ","


def test_xlsx_export_every_value_as_text(tmp_path):
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.title = "Контакты"
    ws = wb.active
    ws.append(["id", "phone", "first_name", "orders"])
    ws.append([1, 79161234567, "Иван", 3])  # numbers as Excel stores them
    ws.append(["C2", "+7 916 123-45-68", "Анна", None])
    other = wb.create_sheet("Сделки")
    other.append(["deal", "amount"])
    path = tmp_path / "crm.xlsx"
    wb.save(path)
    fmt = sniff(path)
    assert fmt.kind == "xlsx" and fmt.describe() == "XLSX, first sheet"
    df = read_export(path, fmt)
    assert df.values.tolist() == [["1", "79161234567", "Иван", "3"], ["C2", "+7 916 123-45-68", "Анна", ""]]
    assert list(read_export(path, sniff(path, sheet="Сделки")).columns) == ["deal", "amount"]
    with pytest.raises(ExportError, match="Нет|not found|Worksheet"):
        read_export(path, sniff(path, sheet="Нет"))


def test_unreadable_files_get_one_clear_error(tmp_path):
    with pytest.raises(ExportError, match="input file not found"):
        sniff(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ExportError, match="empty"):
        sniff(tmp_path / "empty.csv")
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(ExportError, match=r"\.xlsx or CSV"):
        sniff(tmp_path / "old.xls")
    pd.DataFrame({"a": [1]}).to_excel(tmp_path / "renamed.xlsx", index=False)
    (tmp_path / "renamed.xlsx").rename(tmp_path / "renamed.csv")
    with pytest.raises(ExportError, match="name it .xlsx"):
        sniff(tmp_path / "renamed.csv")
    (tmp_path / "bin.csv").write_bytes(bytes(range(1, 9)) * 500 + b"\xff\xfe\x80\x81" * 200)
    with pytest.raises(ExportError, match="encoding"):
        read_export(tmp_path / "bin.csv")


def test_repeated_values_marks_rows_sharing_a_stripped_non_blank_id(tmp_path):
    from smsflow.exports import ExportError, repeated_values, sniff

    p = tmp_path / "e.csv"
    p.write_text("id;phone\n a ;1\nb;2\na;3\n;4\n ;5\nc;6\nb ;7\n", encoding="utf-8")
    assert repeated_values(p, sniff(p), "id", chunksize=2).tolist() == [True, True, True, False, False, False, True]
    empty = tmp_path / "h.csv"
    empty.write_text("id;phone\n", encoding="utf-8")
    assert repeated_values(empty, sniff(empty), "id").tolist() == []
    for text_ in ("x;phone\n1;2\n", "x;phone\n"):
        bad = tmp_path / "bad.csv"
        bad.write_text(text_, encoding="utf-8")
        with pytest.raises(ExportError, match="no single column named 'id'"):
            repeated_values(bad, sniff(bad), "id")
