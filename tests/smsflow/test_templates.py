import math
import textwrap

import jinja2
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsflow.templates import (
    DEFAULT_FOOTERS,
    FOOTER_SEPARATOR,
    MessageTemplate,
    RenderError,
    TemplateCompileError,
    TemplateLoadError,
    build_context,
    load_template,
    render_batch,
    render_contact,
)
from smsflow.sms_encoding import sms_info

RU_FOOTER = DEFAULT_FOOTERS["ru"]
EN_FOOTER = DEFAULT_FOOTERS["en"]

ROW_KEYS = {"contact_id", "language", "text", "encoding", "characters", "units", "segments", "cost"}


def promo(**kw):
    kw.setdefault("variants", {
        "ru": "{{ first_name | default('клиент') }}, скидка {{ discount }}%",
        "en": "{{ first_name | default('customer') }}, {{ discount }}% off",
    })
    return MessageTemplate(name=kw.pop("name", "promo"), **kw)


def tx(source, **kw):
    return MessageTemplate(name=kw.pop("name", "tx"), kind="transactional", variants={"ru": source}, **kw)


def one(contact, template, **kw):
    ok, bad = render_batch([contact], template, **kw)
    assert not bad, bad
    return ok[0]


# ------------------------------------------------------------------ variables


def test_default_filter_fallback_and_row_shape():
    row = one({"contact_id": 1, "language": "ru", "discount": 10}, promo())
    assert set(row) == ROW_KEYS
    assert row["text"] == f"клиент, скидка 10%{FOOTER_SEPARATOR}{RU_FOOTER}"
    assert row["language"] == "ru"
    info = sms_info(row["text"])
    assert (row["encoding"], row["characters"], row["units"], row["segments"]) == (
        info.encoding, info.characters, info.units, info.segments,
    )


def test_strict_undefined_failure_is_quarantined_others_render():
    t = tx("{{ first_name }}, код {{ code }}")
    contacts = [
        {"contact_id": 1, "first_name": "Иван", "code": "1234"},
        {"contact_id": 2, "code": "5678"},
        {"contact_id": 3, "first_name": "Олег", "code": "0000"},
    ]
    ok, bad = render_batch(contacts, t)
    assert [r["contact_id"] for r in ok] == [1, 3]
    assert ok[0]["text"] == "Иван, код 1234"
    assert len(bad) == 1 and bad[0]["contact_id"] == 2
    assert bad[0]["reason"].startswith("template 'tx' (ru): 'first_name' is undefined")
    assert set(bad[0]) == {"contact_id", "reason"}


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan, np.float32("nan"), pd.NA, pd.NaT, "", "   "])
def test_missing_values_become_undefined(missing):
    t = tx("Привет, {{ first_name | default('клиент') }}!")
    assert one({"contact_id": 1, "first_name": missing}, t)["text"] == "Привет, клиент!"
    ok, bad = render_batch([{"contact_id": 1, "first_name": missing}], tx("Привет, {{ first_name }}!"))
    assert not ok and "'first_name' is undefined" in bad[0]["reason"]


def test_values_are_stripped_and_non_strings_render():
    t = tx("{{ first_name }}|{{ n }}|{{ flag }}|{{ x }}")
    row = one({"contact_id": 1, "first_name": "  Иван ", "n": np.int64(5), "flag": False, "x": 0}, t)
    assert row["text"] == "Иван|5|False|0"


def test_nested_attributes_flattened_without_overwriting_top_level():
    t = tx("{{ first_name }} {{ city }} {{ tier | default('std') }} {{ attributes.city }}")
    contact = {
        "contact_id": 1,
        "first_name": "Иван",
        "attributes": {"city": "Казань", "first_name": "НЕ ТО", "tier": None},
    }
    assert one(contact, t)["text"] == "Иван Казань std Казань"


def test_attribute_fills_in_for_missing_top_level_value():
    t = tx("{{ first_name }}")
    assert one({"contact_id": 1, "first_name": None, "attributes": {"first_name": "Анна"}}, t)["text"] == "Анна"


def test_attributes_as_json_string():
    t = tx("{{ city }}")
    assert one({"contact_id": 1, "attributes": '{"city": "Омск"}'}, t)["text"] == "Омск"


def test_extra_context_has_lower_precedence_than_contact():
    t = tx("{{ code }} {{ shop }}")
    ok, bad = render_batch(
        [{"contact_id": 1}, {"contact_id": 2, "shop": "Личный"}],
        t,
        extra={"code": "SALE", "shop": "Магазин"},
    )
    assert [r["text"] for r in ok] == ["SALE Магазин", "SALE Личный"]


def test_sender_name_available_in_context():
    t = tx("{{ sender_name }}: ok", sender_name="SHOP")
    assert one({"contact_id": 1}, t)["text"] == "SHOP: ok"


def test_build_context_drops_missing():
    ctx = build_context({"a": None, "b": "", "c": "x", "d": math.nan, "attributes": {"e": 1, "f": None}})
    assert ctx == {"c": "x", "e": 1, "attributes": {"e": 1}}


def test_pandas_records():
    df = pd.DataFrame({"contact_id": [1, 2], "first_name": ["Иван", None], "language": ["en", None]})
    for records in (df.to_dict("records"), df.convert_dtypes().to_dict("records")):
        ok, bad = render_batch(records, promo(), extra={"discount": 5})
        assert not bad
        assert ok[0]["text"] == f"Иван, 5% off\n{EN_FOOTER}"
        assert ok[1]["text"] == f"клиент, скидка 5%\n{RU_FOOTER}"


# ------------------------------------------------------------------ variants


@pytest.mark.parametrize(
    "language, expected",
    [
        ("ru", "ru"), ("en", "en"), ("EN", "en"), ("en-GB", "en"), ("en_US", "en"),
        ("de", "ru"), (None, "ru"), (float("nan"), "ru"), ("", "ru"),
    ],
)
def test_variant_choice_and_default_language_fallback(language, expected):
    row = one({"contact_id": 1, "language": language, "discount": 1}, promo())
    assert row["language"] == expected
    assert row["text"].endswith(DEFAULT_FOOTERS[expected])


def test_fallback_to_first_variant_when_no_default_language_variant():
    t = MessageTemplate(name="en_only", variants={"en": "Hello"})
    row = one({"contact_id": 1, "language": "ru"}, t)
    assert row["language"] == "en"
    assert row["text"] == f"Hello\n{EN_FOOTER}"


def test_default_language_can_be_changed():
    t = promo(default_language="en")
    assert one({"contact_id": 1, "language": "fr", "discount": 3}, t)["language"] == "en"


# ------------------------------------------------------------------ footer


def test_footer_on_marketing_not_on_transactional():
    m = MessageTemplate(name="m", kind="marketing", variants={"ru": "Скидки!", "en": "Sale!"})
    t = MessageTemplate(name="t", kind="transactional", variants={"ru": "Код 1234", "en": "Code 1234"})
    assert one({"contact_id": 1, "language": "ru"}, m)["text"] == "Скидки!\n" + RU_FOOTER
    assert one({"contact_id": 1, "language": "en"}, m)["text"] == "Sale!\n" + EN_FOOTER
    assert one({"contact_id": 1, "language": "ru"}, t)["text"] == "Код 1234"
    assert one({"contact_id": 1, "language": "en"}, t)["text"] == "Code 1234"


def test_custom_footer_and_no_duplicate_footer():
    t = MessageTemplate(name="m", variants={"ru": "Акция! Отписка: СТОП"}, footer={"ru": "Отписка: СТОП"})
    assert one({"contact_id": 1}, t)["text"] == "Акция! Отписка: СТОП"


def test_marketing_variant_without_footer_is_rejected_at_load():
    with pytest.raises(TemplateLoadError, match="footer"):
        MessageTemplate(name="m", variants={"de": "Hallo"})
    MessageTemplate(name="m", variants={"de": "Hallo"}, footer={"de": "STOP zum Abmelden"})
    MessageTemplate(name="t", kind="transactional", variants={"de": "Hallo"})


def test_footer_is_counted_in_segments():
    body = "a" * 150
    row = one({"contact_id": 1, "language": "en"}, MessageTemplate(name="m", variants={"en": body}))
    assert row["characters"] == 150 + 1 + len(EN_FOOTER)
    assert row["segments"] == 2


# ------------------------------------------------------------------ failures


def test_sandbox_blocks_dunder_access_as_failure():
    t = tx("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    ok, bad = render_batch([{"contact_id": 1}, {"contact_id": 2}], t)
    assert ok == []
    assert [b["contact_id"] for b in bad] == [1, 2]
    assert "unsafe" in bad[0]["reason"] and "template 'tx'" in bad[0]["reason"]


def test_sandbox_blocks_attribute_of_data():
    t = tx("{{ first_name.__class__ }}")
    ok, bad = render_batch([{"contact_id": 1, "first_name": "x"}], t)
    assert not ok and "unsafe" in bad[0]["reason"]


def test_runtime_exception_is_quarantined_with_line():
    t = tx("строка\n{{ 10 / n }}")
    ok, bad = render_batch([{"contact_id": 1, "n": 0}, {"contact_id": 2, "n": 5}], t)
    assert [r["text"] for r in ok] == ["строка\n2.0"]
    assert bad == [{"contact_id": 1, "reason": "template 'tx' (ru): ZeroDivisionError: division by zero (line 2)"}]


def test_empty_rendered_text_is_failure():
    t = tx("{% if vip is defined %}VIP{% endif %}  \n")
    ok, bad = render_batch([{"contact_id": 1}, {"contact_id": 2, "vip": True}], t)
    assert [r["text"] for r in ok] == ["VIP"]
    assert bad[0]["contact_id"] == 1 and "rendered text is empty" in bad[0]["reason"]


def test_empty_body_fails_even_for_marketing_with_footer():
    ok, bad = render_batch([{"contact_id": 1}], MessageTemplate(name="m", variants={"ru": "   "}))
    assert not ok and "rendered text is empty" in bad[0]["reason"]


def test_non_mapping_contact_is_failure():
    ok, bad = render_batch([None, {"contact_id": 2}], tx("ok"))  # type: ignore[list-item]
    assert len(ok) == 1 and bad[0]["contact_id"] is None


def test_render_contact_raises_render_error():
    with pytest.raises(RenderError, match="'first_name' is undefined"):
        render_contact({"contact_id": 1}, tx("{{ first_name }}"))
    assert render_contact({"first_name": "Ян"}, tx("{{ first_name }}")) == ("ru", "Ян")


def test_output_is_plain_text_not_html_escaped():
    assert one({"contact_id": 1, "q": "<b>&"}, tx("{{ q }} \"x\""))["text"] == "<b>& \"x\""


# ------------------------------------------------------------------ cost


def test_cost_is_segments_times_price():
    contacts = [
        {"contact_id": 1, "body": "a" * 10},
        {"contact_id": 2, "body": "a" * 200},
        {"contact_id": 3, "body": "ж" * 140},
    ]
    ok, _ = render_batch(contacts, tx("{{ body }}"), price_per_segment=0.123456)
    assert [r["segments"] for r in ok] == [1, 2, 3]
    for r in ok:
        assert r["cost"] == round(r["segments"] * 0.123456, 4)
    ok, _ = render_batch(contacts, tx("{{ body }}"))
    assert all(r["cost"] == 0.0 for r in ok)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=200)), max_size=20))
def test_batch_never_crashes_and_partitions_contacts(names):
    contacts = [{"contact_id": i, "first_name": n} for i, n in enumerate(names)]
    ok, bad = render_batch(contacts, tx("{{ first_name }}"), price_per_segment=0.5)
    assert sorted([r["contact_id"] for r in ok] + [b["contact_id"] for b in bad]) == list(range(len(names)))
    for r in ok:
        assert r["text"] == r["text"].strip() and r["text"]
        assert r["segments"] == sms_info(r["text"]).segments
        assert r["cost"] == round(r["segments"] * 0.5, 4)


# ------------------------------------------------------------------ loading


def test_syntax_error_raises_at_construction_with_details():
    with pytest.raises(TemplateCompileError) as ei:
        MessageTemplate(name="broken", variants={"ru": "ok", "en": "Hi\n{% if x %}oops"})
    err = ei.value
    assert isinstance(err, jinja2.TemplateError)
    assert (err.template, err.language, err.lineno) == ("broken", "en", 2)
    assert "template 'broken' variant 'en'" in str(err) and "line 2" in str(err)


def test_invalid_definitions_rejected():
    with pytest.raises(TemplateLoadError, match="kind"):
        MessageTemplate(name="x", kind="promo", variants={"ru": "a"})
    with pytest.raises(TemplateLoadError, match="variants"):
        MessageTemplate(name="x", variants={})
    with pytest.raises(TemplateLoadError, match="must be a string"):
        MessageTemplate(name="x", variants={"ru": 5})


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_load_yaml_template(tmp_path):
    p = write(tmp_path / "welcome.yaml", """
        kind: transactional
        default_language: en
        sender_name: SHOP
        variants:
          ru: "Добро пожаловать, {{ first_name | default('друг') }}!"
          en: "Welcome, {{ first_name | default('friend') }}!"
        """)
    t = load_template(p)
    assert (t.name, t.kind, t.default_language, t.sender_name) == ("welcome", "transactional", "en", "SHOP")
    assert one({"contact_id": 1, "language": "ru"}, t)["text"] == "Добро пожаловать, друг!"
    assert one({"contact_id": 1, "language": "xx"}, t)["text"] == "Welcome, friend!"


def test_load_yaml_errors_are_clear(tmp_path):
    with pytest.raises(TemplateCompileError, match=r"template 'bad' variant 'ru'.*bad\.yaml.*line 1"):
        load_template(write(tmp_path / "bad.yaml", """
            name: bad
            variants:
              ru: "{{ first_name "
            """))
    with pytest.raises(TemplateLoadError, match="unknown keys"):
        load_template(write(tmp_path / "typo.yaml", "footers: {}\nvariants: {ru: x}\n"))
    with pytest.raises(TemplateLoadError, match="invalid YAML"):
        load_template(write(tmp_path / "yaml.yaml", "variants: [unclosed\n"))


def test_load_plain_jinja_file(tmp_path):
    t = load_template(write(tmp_path / "flash.j2", "Распродажа, {{ first_name | default('друг') }}!\n"))
    assert (t.name, t.kind, t.languages) == ("flash", "marketing", ["ru"])
    row = one({"contact_id": 1, "language": "en"}, t)
    assert row["text"] == f"Распродажа, друг!\n{RU_FOOTER}"
    assert load_template(write(tmp_path / "note.txt", "hi")).name == "note"


def test_load_sibling_language_files(tmp_path):
    write(tmp_path / "promo.j2", "Скидка!")
    write(tmp_path / "promo.en.j2", "Sale!")
    write(tmp_path / "other.j2", "x")
    t = load_template(tmp_path / "promo.j2")
    assert t.name == "promo" and sorted(t.languages) == ["en", "ru"]
    assert one({"contact_id": 1, "language": "en"}, t)["text"] == "Sale!\n" + EN_FOOTER
    assert load_template(tmp_path / "promo.en.j2").variants == t.variants


def test_sibling_conflict_and_broken_sibling(tmp_path):
    write(tmp_path / "a.j2", "x")
    write(tmp_path / "a.ru.j2", "y")
    with pytest.raises(TemplateLoadError, match="define the 'ru' variant"):
        load_template(tmp_path / "a.j2")
    write(tmp_path / "b.j2", "ok")
    write(tmp_path / "b.en.j2", "line\n{{ oops ")
    with pytest.raises(TemplateCompileError, match=r"variant 'en' \(.*b\.en\.j2\).*line 2"):
        load_template(tmp_path / "b.j2")


def test_compiled_once_and_shared(tmp_path):
    a = MessageTemplate(name="a", variants={"ru": "same {{ x }}"})
    b = MessageTemplate(name="b", variants={"ru": "same {{ x }}"})
    assert a._compiled["ru"].template is b._compiled["ru"].template


def test_template_pickles_for_process_pools():
    import pickle

    t = MessageTemplate(name="p", variants={"ru": "{{ a }}", "en": "{{ a }}!"}, footer={"ru": "СТОП"},
                        sender_name="S", origin="x.yaml")
    t2 = pickle.loads(pickle.dumps(t))
    assert (t2.name, t2.variants, t2.kind, t2.footer, t2.sender_name, t2.origin) == (
        t.name, t.variants, t.kind, t.footer, t.sender_name, t.origin)
    assert render_batch([{"contact_id": 1, "a": "x"}], t2) == render_batch([{"contact_id": 1, "a": "x"}], t)


def test_marketing_messages_carry_the_sender_name_per_language():
    from smsflow.templates import MessageTemplate, render_batch

    tpl = MessageTemplate(name="p", variants={"ru": "Скидка 10%", "en": "10% off"},
                          sender_name={"ru": "Магазин Ромашка", "en": "Romashka Shop"})
    rendered, failed = render_batch([{"contact_id": 1, "language": "ru"}, {"contact_id": 2, "language": "en"}], tpl)
    assert not failed
    assert rendered[0]["text"].startswith("Магазин Ромашка: Скидка 10%") and rendered[0]["text"].endswith("СТОП")
    assert rendered[1]["text"].startswith("Romashka Shop: 10% off") and rendered[1]["text"].endswith("Reply STOP to opt out")
    already = MessageTemplate(name="q", variants={"ru": "Ромашка: скидка"}, sender_name="Ромашка")
    assert render_batch([{"contact_id": 1}], already)[0][0]["text"].startswith("Ромашка: скидка")
    tx = MessageTemplate(name="t", kind="transactional", variants={"ru": "Заказ готов"}, sender_name="Ромашка")
    assert render_batch([{"contact_id": 1}], tx)[0][0]["text"] == "Заказ готов"


# ------------------------------------------------------------------ reusing texts


def _count_renders(monkeypatch):
    import smsflow.templates as templates

    calls = []
    real = templates._Renderer._render

    def counting(self, contact):
        calls.append(contact.get("contact_id"))
        return real(self, contact)

    monkeypatch.setattr(templates._Renderer, "_render", counting)
    return calls


def test_a_deterministic_template_renders_each_distinct_set_of_values_once(monkeypatch):
    """Contacts with the same variant and the same cleaned values of the template's names get the text rendered
    for the first of them; every text equals a render of that contact on its own (types are told apart:
    True, 1, 1.0 and "1" render differently; " Анна " and "Анна" the same; "", None and a missing key alike)."""
    t = MessageTemplate(name="m", variants={"ru": "{{ first_name | default('клиент') }}: {{ n | default('-') }}",
                                            "en": "{{ first_name | default('customer') }}, {{ n | default('-') }}"},
                        kind="transactional")
    assert t.deterministic
    names = ["Анна", " Анна ", "Anna", "", None]
    ns = [True, 1, 1.0, "1", None, float("nan")]
    langs = ["ru", "RU", "en-GB", None, "de"]
    contacts = []
    for i in range(600):
        c = {"contact_id": i, "first_name": names[i % 5], "language": langs[(i // 5) % 5], "attributes": None}
        if i % 7:
            c["n"] = ns[(i // 25) % 6]
        contacts.append(c)
    singles = [render_contact(c, t) for c in contacts]  # one renderer per contact: nothing reused
    calls = _count_renders(monkeypatch)
    ok, bad = render_batch(contacts, t)
    assert not bad
    assert [(r["language"], r["text"]) for r in ok] == singles
    assert {r["text"] for r in ok} >= {"Анна: True", "Анна: 1", "Анна: 1.0", "клиент: -", "Anna, 1", "customer, True"}

    def missing(v):
        return v is None or v == "" or (isinstance(v, float) and math.isnan(v))

    def values(c):  # what the text depends on: the variant, and each name's value with its type, or missing
        n, first = c.get("n"), c["first_name"]
        return (t.choose_language(c["language"]), None if missing(first) else first.strip(),
                None if missing(n) else (type(n), str(n)))

    assert len(calls) == len({values(c) for c in contacts}) == 30


def test_texts_are_not_reused_for_links_random_lipsum_or_contacts_with_attributes(monkeypatch):
    link = MessageTemplate(name="l", kind="transactional", variants={"ru": "{{ first_name }} {{ link('https://e.ru/a') }}"})
    rnd = MessageTemplate(name="r", kind="transactional", variants={"ru": "{{ first_name }} {{ range(10**5) | random }}"})
    lip = MessageTemplate(name="p", kind="transactional", variants={"ru": "{{ first_name }} {{ lipsum(1, False, 3, 5) }}"})
    assert not (link.deterministic or rnd.deterministic or lip.deterministic)
    same = [{"contact_id": i, "first_name": "Анна", "attributes": None} for i in range(50)]
    ok, bad = render_batch(same, rnd)
    assert not bad and len({r["text"] for r in ok}) > 40
    ok, bad = render_batch(same, link, extra={"link_base": "https://s.example"})
    assert not bad and len({r["text"] for r in ok}) == 50
    # a template name that comes from the CRM attributes: each contact's own value, even with equal top-level fields
    city = MessageTemplate(name="c", kind="transactional", variants={"ru": "{{ first_name }} из {{ city }}"})
    assert city.deterministic
    calls = _count_renders(monkeypatch)
    ok, bad = render_batch([{"contact_id": i, "first_name": "Анна", "attributes": {"city": f"Город {i % 3}"}}
                            for i in range(9)], city)
    assert not bad and [r["text"] for r in ok] == [f"Анна из Город {i % 3}" for i in range(9)]
    assert len(calls) == 9


def test_reusing_stops_when_values_are_mostly_distinct(monkeypatch):
    import smsflow.templates as templates

    monkeypatch.setattr(templates, "_MEMO_TRIAL", 50)
    t = MessageTemplate(name="o", kind="transactional", variants={"ru": "Заказ {{ order_id }} отправлен"})
    r = templates._Renderer(t, None)
    texts = [r.render({"contact_id": i, "order_id": f"A-{i}", "attributes": None})[1] for i in range(200)]
    assert texts == [f"Заказ A-{i} отправлен" for i in range(200)]
    assert r._memo is None  # 50 distinct, no reuse: stopped keeping them
    r = templates._Renderer(t, None)
    texts = [r.render({"contact_id": i, "order_id": f"A-{i % 3}", "attributes": None})[1] for i in range(200)]
    assert texts == [f"Заказ A-{i % 3} отправлен" for i in range(200)] and len(r._memo) == 3
