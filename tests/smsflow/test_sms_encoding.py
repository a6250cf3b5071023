import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsflow.sms_encoding import (
    GSM_BASIC_CHARS,
    GSM_EXTENSION_CHARS,
    SmsInfo,
    is_gsm7,
    message_cost,
    sms_info,
    sms_info_batch,
    split_parts,
)

EMOJI = "\U0001F600"  # 😀, a surrogate pair in UTF-16


def gsm_units(part: str) -> int:
    return sum(2 if c in GSM_EXTENSION_CHARS else 1 for c in part)


def utf16_units(part: str) -> int:
    return sum(2 if ord(c) > 0xFFFF else 1 for c in part)


# --------------------------------------------------------------- basics


def test_smsinfo_to_dict_keys():
    info = sms_info("Hi")
    assert info == SmsInfo("GSM-7", 2, 2, 1)
    assert info.to_dict() == {"encoding": "GSM-7", "characters": 2, "units": 2, "segments": 1}


def test_empty_text_is_one_empty_segment():
    assert sms_info("") == SmsInfo("GSM-7", 0, 0, 1)
    assert split_parts("") == [""]


def test_whole_gsm_alphabet_is_gsm7():
    assert sms_info(GSM_BASIC_CHARS).encoding == "GSM-7"
    assert sms_info(GSM_BASIC_CHARS).units == len(GSM_BASIC_CHARS)
    assert sms_info(GSM_EXTENSION_CHARS).units == 2 * len(GSM_EXTENSION_CHARS)


@pytest.mark.parametrize("ch", list(GSM_EXTENSION_CHARS))
def test_extension_chars_cost_two_septets(ch):
    info = sms_info("a" + ch)
    assert (info.encoding, info.characters, info.units) == ("GSM-7", 2, 3)


def test_euro_counts_two():
    assert sms_info("€").units == 2
    assert sms_info("100€").to_dict() == {"encoding": "GSM-7", "characters": 4, "units": 5, "segments": 1}


@pytest.mark.parametrize("text", ["Привет", "a" * 100 + "ж", "`backtick", "tab\there", "esc\x1b", "Ç" + "ç"])
def test_non_gsm_forces_ucs2(text):
    assert sms_info(text).encoding == "UCS-2"
    assert not is_gsm7(text)


def test_cyrillic_forces_ucs2_for_whole_message():
    text = "Hello " * 10 + "Ю"
    info = sms_info(text)
    assert info.encoding == "UCS-2"
    assert info.units == len(text) == 61
    assert info.segments == 1


# --------------------------------------------------------------- GSM-7 limits


def test_gsm_160_is_one_segment_161_is_two():
    assert sms_info("a" * 160).segments == 1
    assert sms_info("a" * 161).segments == 2


def test_gsm_multipart_153_boundaries():
    assert sms_info("a" * 306).segments == 2
    assert sms_info("a" * 307).segments == 3
    parts = split_parts("a" * 307)
    assert [len(p) for p in parts] == [153, 153, 1]


def test_gsm_extension_within_single_limit():
    assert sms_info("a" * 158 + "€").to_dict() == {
        "encoding": "GSM-7", "characters": 159, "units": 160, "segments": 1,
    }
    assert sms_info("a" * 159 + "€").segments == 2  # 161 septets


def test_extension_char_at_part_boundary_moves_to_next_part():
    # 152 septets, then '{' would occupy septets 153+154 -> must go to part 2
    text = "a" * 152 + "{" + "b" * 10
    parts = split_parts(text)
    assert parts == ["a" * 152, "{" + "b" * 10]
    assert gsm_units(parts[0]) == 152
    assert sms_info(text).segments == 2


def test_extension_char_just_fitting_stays():
    text = "a" * 151 + "{" + "b" * 10  # '{' ends exactly at septet 153
    assert split_parts(text) == ["a" * 151 + "{", "b" * 10]


def test_boundary_shift_can_add_a_segment():
    # 306 septets would fit in 2 parts of 153, but the escape pair at septets
    # 153/154 moves to part 2 and wastes one septet -> 3 parts
    text = "a" * 152 + "€" + "a" * 152
    assert sms_info(text).units == 306
    assert sms_info(text).segments == 3
    assert split_parts(text) == ["a" * 152, "€" + "a" * 151, "a"]


# --------------------------------------------------------------- UCS-2 limits


def test_ucs2_70_is_one_segment_71_is_two():
    assert sms_info("ж" * 70).to_dict() == {"encoding": "UCS-2", "characters": 70, "units": 70, "segments": 1}
    assert sms_info("ж" * 71).segments == 2


def test_ucs2_multipart_67_boundaries():
    assert sms_info("ж" * 134).segments == 2
    assert sms_info("ж" * 135).segments == 3
    assert [len(p) for p in split_parts("ж" * 135)] == [67, 67, 1]


def test_emoji_is_two_units():
    info = sms_info(EMOJI)
    assert (info.encoding, info.characters, info.units, info.segments) == ("UCS-2", 1, 2, 1)
    assert sms_info("ж" * 68 + EMOJI).segments == 1  # 70 units
    assert sms_info("ж" * 69 + EMOJI).segments == 2  # 71 units


def test_surrogate_pair_at_boundary_moves_to_next_part():
    text = "ж" * 66 + EMOJI + "ж" * 10
    parts = split_parts(text)
    assert parts == ["ж" * 66, EMOJI + "ж" * 10]
    assert sms_info(text).units == 78
    assert sms_info(text).segments == 2


def test_surrogate_pair_at_boundary_can_add_segment():
    text = "ж" * 66 + EMOJI + "ж" * 66  # 134 units = 2 * 67, but needs 3 parts
    assert sms_info(text).units == 134
    assert sms_info(text).segments == 3
    assert split_parts(text) == ["ж" * 66, EMOJI + "ж" * 65, "ж"]
    # one unit less fits in 2 parts
    assert sms_info("ж" * 66 + EMOJI + "ж" * 65).segments == 2


def test_lone_surrogate_does_not_crash():
    info = sms_info("abc\ud800")
    assert info.encoding == "UCS-2" and info.units == 4


# --------------------------------------------------------------- batch / cost


def test_batch_matches_single():
    texts = ["", "Hi", "a" * 161, "Привет", "€" * 81, "ж" * 66 + EMOJI + "ж" * 66, "a" * 152 + "€" + "a" * 152]
    enc, chars, units, segs = sms_info_batch(texts)
    assert [SmsInfo(*row) for row in zip(enc, chars, units, segs)] == [sms_info(t) for t in texts]


def test_batch_empty_list():
    assert sms_info_batch([]) == ([], [], [], [])


def test_message_cost():
    assert message_cost(3, 0.1) == 0.3
    assert message_cost(2, 1.23456789) == 2.4691
    assert message_cost(0, 5.0) == 0.0


def test_type_errors():
    with pytest.raises(TypeError):
        sms_info(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        split_parts(123)  # type: ignore[arg-type]


# --------------------------------------------------------------- properties

_alphabet = st.one_of(
    st.sampled_from(GSM_BASIC_CHARS),
    st.sampled_from(GSM_EXTENSION_CHARS),
    st.sampled_from("абвгдЖЮЯё"),
    st.sampled_from([EMOJI, "\U0001F389", "\U0001D400"]),
)
sms_texts = st.one_of(
    st.text(alphabet=st.sampled_from(GSM_BASIC_CHARS + GSM_EXTENSION_CHARS), max_size=500),
    st.text(alphabet=_alphabet, max_size=400),
    st.text(max_size=300),
)


@settings(max_examples=400, deadline=None)
@given(sms_texts)
def test_split_parts_properties(text):
    info = sms_info(text)
    parts = split_parts(text)
    assert "".join(parts) == text
    assert len(parts) == info.segments
    assert info.characters == len(text)
    units = gsm_units if info.encoding == "GSM-7" else utf16_units
    assert info.encoding == ("GSM-7" if is_gsm7(text) else "UCS-2")
    assert info.units == units(text)
    if len(parts) == 1:
        assert info.units <= (160 if info.encoding == "GSM-7" else 70)
    else:
        limit = 153 if info.encoding == "GSM-7" else 67
        assert info.units > (160 if info.encoding == "GSM-7" else 70)
        for i, part in enumerate(parts):
            assert part  # no empty parts
            assert units(part) <= limit
            if i < len(parts) - 1:  # greedy: the next char really did not fit
                assert units(part) + units(parts[i + 1][0]) > limit


@settings(max_examples=100, deadline=None)
@given(st.lists(sms_texts, max_size=30))
def test_batch_equals_single_property(texts):
    enc, chars, units, segs = sms_info_batch(texts)
    assert [SmsInfo(*row) for row in zip(enc, chars, units, segs)] == [sms_info(t) for t in texts]


def reference_parts(text: str) -> list[str]:
    """Obvious char-by-char implementation to check the optimised one."""
    gsm = all(c in GSM_BASIC_CHARS or c in GSM_EXTENSION_CHARS for c in text)
    units = gsm_units if gsm else utf16_units
    single, multi = (160, 153) if gsm else (70, 67)
    if units(text) <= single:
        return [text]
    parts, cur, used = [], "", 0
    for c in text:
        w = units(c)
        if used + w > multi:
            parts.append(cur)
            cur, used = "", 0
        cur += c
        used += w
    parts.append(cur)
    return parts


boundary_texts = st.builds(
    lambda fill, n, heavy, k, tail: fill * n + heavy * k + fill * tail,
    st.sampled_from(["a", "ж"]),
    st.integers(0, 320),
    st.sampled_from(["€", "{", EMOJI]),
    st.integers(1, 3),
    st.integers(0, 200),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(boundary_texts, sms_texts))
def test_matches_reference_implementation(text):
    expected = reference_parts(text)
    assert split_parts(text) == expected
    assert sms_info(text).segments == len(expected)
    assert sms_info_batch([text])[3] == [len(expected)]
