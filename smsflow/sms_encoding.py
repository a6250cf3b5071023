"""SMS encoding detection and segment counting (GSM 03.38 / UCS-2).

Pure functions, no Prefect imports, so they can be used from tasks, the CLI
and tests alike.

Rules implemented
-----------------
* A text is **GSM-7** when every character is in the GSM 03.38 default
  alphabet or its extension table; otherwise it is **UCS-2** (really UTF-16,
  as every modern handset / SMSC does).  National language shift tables
  (Turkish, Spanish, Portuguese, Indian languages) are not used.
* The ESC code point itself (U+001B) is *not* accepted as a GSM character:
  it cannot be sent literally, so a text containing it is UCS-2.
* Units: GSM-7 counts septets, an extension character costs 2 (ESC + char).
  UCS-2 counts UTF-16 code units, an astral character (emoji, ...) costs 2
  (surrogate pair).
* One segment holds 160 septets / 70 units.  Longer messages are split into
  concatenated parts of at most 153 septets / 67 units (the rest goes to the
  User Data Header); an ESC+char pair and a surrogate pair are never split,
  so a part may be one unit short of full.
* Empty text: reported as **1 segment with 0 units** (GSM-7).  That is what
  handsets display and what an SMSC would bill if it accepted the message;
  ``split_parts("") == [""]`` keeps ``len(parts) == segments``.  Callers that
  must not send empty messages (``smsflow.templates``) reject them beforehand.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

__all__ = [
    "GSM7",
    "UCS2",
    "GSM_BASIC_CHARS",
    "GSM_EXTENSION_CHARS",
    "SINGLE_GSM7",
    "MULTI_GSM7",
    "SINGLE_UCS2",
    "MULTI_UCS2",
    "SmsInfo",
    "is_gsm7",
    "sms_info",
    "split_parts",
    "sms_info_batch",
    "message_cost",
]

GSM7 = "GSM-7"
UCS2 = "UCS-2"

SINGLE_GSM7 = 160
MULTI_GSM7 = 153
SINGLE_UCS2 = 70
MULTI_UCS2 = 67

# GSM 03.38 default alphabet, in code order 0x00..0x7F, minus 0x1B (ESC).
GSM_BASIC_CHARS = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ" "ÆæßÉ"  # 0x1B (ESC) intentionally left out
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
# Extension table (each costs ESC + char = 2 septets): form feed ^ { } \ [ ~ ] | €
GSM_EXTENSION_CHARS = "\f^{}\\[~]|€"

assert len(GSM_BASIC_CHARS) == 127 and len(set(GSM_BASIC_CHARS)) == 127
assert not set(GSM_BASIC_CHARS) & set(GSM_EXTENSION_CHARS)

def _char_class(chars: str) -> str:
    return "".join("\\" + c if c in "\\]^-[" else c for c in chars)


_BASIC_CLASS = _char_class(GSM_BASIC_CHARS)
_EXT_CLASS = _char_class(GSM_EXTENSION_CHARS)
# first char outside the basic alphabet / outside basic+extension
_NON_BASIC = re.compile(f"[^{_BASIC_CLASS}]")
_NON_GSM = re.compile(f"[^{_BASIC_CLASS}{_EXT_CLASS}]")
_EXT = re.compile(f"[{_EXT_CLASS}]")
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


@dataclass(frozen=True, slots=True)
class SmsInfo:
    """Encoding statistics of one SMS text."""

    encoding: str  # "GSM-7" | "UCS-2"
    characters: int  # Unicode code points
    units: int  # septets (GSM-7, escapes included) or UTF-16 code units (UCS-2)
    segments: int

    def to_dict(self) -> dict:
        return {
            "encoding": self.encoding,
            "characters": self.characters,
            "units": self.units,
            "segments": self.segments,
        }


def is_gsm7(text: str) -> bool:
    """True if *text* can be sent in the GSM 7-bit alphabet (with extension)."""
    return _NON_GSM.search(text) is None


def _utf16_units(text: str) -> int:
    # surrogatepass: lone surrogates (invalid, but possible in a Python str)
    # count as one unit instead of raising.
    return len(text.encode("utf-16-le", "surrogatepass")) >> 1


def _part_starts(text: str, encoding: str) -> list[int]:
    """Start index of every part of a *multipart* message.

    Greedy packing (what SMSCs do): each part takes the longest prefix of the
    remaining text whose cost fits in 153 septets / 67 units, where
    "heavy" characters (extension chars / astral chars) cost 2 and are never
    cut in half.  Works on the sorted positions of heavy characters, so the
    cost is O(parts + heavy chars) instead of a Python loop over every char.
    """
    if encoding == GSM7:
        limit, heavy_re = MULTI_GSM7, _EXT
    else:
        limit, heavy_re = MULTI_UCS2, _ASTRAL
    heavy = [m.start() for m in heavy_re.finditer(text)]
    n = len(text)
    starts = [0]
    s = 0
    lo = 0  # index in `heavy` of the first heavy char >= s
    while True:
        e = s + limit  # every char costs >= 1, so the part ends at or before s+limit
        if e > n:
            e = n
        hi = bisect_left(heavy, e, lo)
        cost = (e - s) + (hi - lo)
        while cost > limit:  # drop trailing chars until the part fits
            e -= 1
            if hi > lo and heavy[hi - 1] == e:
                hi -= 1
                cost -= 2
            else:
                cost -= 1
        if e >= n:
            return starts
        starts.append(e)
        s, lo = e, hi


def _multipart_segments(text: str, encoding: str, units: int, limit: int) -> int:
    """Segment count of a multipart text that contains heavy (2-unit) chars.

    Greedy packing wastes at most one unit per non-final part (a heavy char
    that does not fit moves on), so every non-final part carries >= limit-1
    units.  Hence ceil(units/limit) <= segments <= (units-1)//(limit-1) + 1;
    when both bounds agree (almost always) no walk is needed.
    """
    low = -(-units // limit)
    if low == (units - 1) // (limit - 1) + 1:
        return low
    return len(_part_starts(text, encoding))


def _analyse(text: str) -> tuple[str, int, int, int]:
    """(encoding, characters, units, segments) -- the single source of truth."""
    n = len(text)
    m = _NON_BASIC.search(text)
    if m is None:  # pure basic alphabet: units == characters
        if n <= SINGLE_GSM7:
            return GSM7, n, n, 1
        return GSM7, n, n, (n + MULTI_GSM7 - 1) // MULTI_GSM7
    pos = m.start()
    if _NON_GSM.search(text, pos) is None:  # GSM-7 with extension chars
        units = n + len(_EXT.findall(text, pos))
        if units <= SINGLE_GSM7:
            return GSM7, n, units, 1
        return GSM7, n, units, _multipart_segments(text, GSM7, units, MULTI_GSM7)
    units = _utf16_units(text)
    if units <= SINGLE_UCS2:
        return UCS2, n, units, 1
    if units == n:  # no surrogate pairs: plain division
        return UCS2, n, units, (units + MULTI_UCS2 - 1) // MULTI_UCS2
    return UCS2, n, units, _multipart_segments(text, UCS2, units, MULTI_UCS2)


def sms_info(text: str) -> SmsInfo:
    """Encoding, length and segment count of *text*.

    >>> sms_info("Hello")
    SmsInfo(encoding='GSM-7', characters=5, units=5, segments=1)
    >>> sms_info("Привет").encoding
    'UCS-2'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    return SmsInfo(*_analyse(text))


def split_parts(text: str) -> list[str]:
    """Split *text* into the parts an SMSC would send.

    ``"".join(split_parts(t)) == t`` and ``len(split_parts(t)) ==
    sms_info(t).segments`` always hold.  Empty text gives ``[""]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    encoding, _n, _units, segments = _analyse(text)
    if segments == 1:
        return [text]
    starts = _part_starts(text, encoding)
    ends = starts[1:] + [len(text)]
    return [text[s:e] for s, e in zip(starts, ends)]


def sms_info_batch(texts: list[str]) -> tuple[list[str], list[int], list[int], list[int]]:
    """Column-wise :func:`sms_info` for many texts, tuned for throughput.

    Returns ``(encodings, characters, units, segments)`` as four lists of the
    same length as *texts*.  The common cases are handled with C-speed regex
    scans; a character-by-character walk happens only for multipart texts
    containing extension characters or surrogate pairs.
    """
    k = len(texts)
    encodings: list[str] = [GSM7] * k
    characters: list[int] = [0] * k
    units_out: list[int] = [0] * k
    segments: list[int] = [1] * k

    non_basic = _NON_BASIC.search
    non_gsm = _NON_GSM.search
    ext_findall = _EXT.findall
    multipart = _multipart_segments
    s7, m7, s16, m16 = SINGLE_GSM7, MULTI_GSM7, SINGLE_UCS2, MULTI_UCS2
    m7b, m16b = MULTI_GSM7 - 1, MULTI_UCS2 - 1

    for i, t in enumerate(texts):
        n = len(t)
        characters[i] = n
        m = non_basic(t)
        if m is None:
            units_out[i] = n
            if n > s7:
                segments[i] = (n + m7b) // m7
            continue
        pos = m.start()
        if non_gsm(t, pos) is None:
            u = n + len(ext_findall(t, pos))
            units_out[i] = u
            if u > s7:
                segments[i] = multipart(t, GSM7, u, m7)
            continue
        encodings[i] = UCS2
        u = len(t.encode("utf-16-le", "surrogatepass")) >> 1
        units_out[i] = u
        if u > s16:
            if u == n:
                segments[i] = (u + m16b) // m16
            else:
                segments[i] = multipart(t, UCS2, u, m16)
    return encodings, characters, units_out, segments


def message_cost(segments: int, price_per_segment: float) -> float:
    """Price of a message: ``segments * price_per_segment`` rounded to 4 decimals."""
    return round(segments * price_per_segment, 4)
