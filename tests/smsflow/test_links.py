"""smsflow/links.py: short-link codes, targets with UTM, bot and preview detection, the IP-hash key."""
from __future__ import annotations

from collections import Counter

import pytest

from smsflow import links


def test_codes_are_7_characters_of_an_alphabet_without_look_alikes_and_random():
    codes = [links.new_code() for _ in range(20_000)]
    assert all(len(c) == 7 and links.is_code(c) for c in codes)
    assert not set("0Oo1lIi") & set("".join(codes))
    assert len(set(codes)) == len(codes)
    # every character of the alphabet is drawn about equally often (no bias a scanner could use)
    from scipy.stats import chisquare

    counts = Counter("".join(codes))
    assert len(counts) == len(links.ALPHABET)
    assert chisquare(list(counts.values())).pvalue > 1e-4


@pytest.mark.parametrize("bad", ["", "abc", "abcdefgh", "abcdef0", "abcdefO", "abc/efg", "абвгдеж", "abcdef\n"])
def test_malformed_codes_are_not_codes(bad):
    assert not links.is_code(bad)


def test_targets_keep_their_query_and_get_the_campaign_utm_unless_they_have_it():
    assert links.target_url("https://shop.example/sale?x=1", {"utm_source": "sms", "utm_campaign": "spring"}) == (
        "https://shop.example/sale?x=1&utm_source=sms&utm_campaign=spring")
    assert links.target_url("https://shop.example/?utm_source=crm", {"utm_source": "sms"}) == (
        "https://shop.example/?utm_source=crm")
    assert links.target_url("https://shop.example/a b") == "https://shop.example/a b"
    for bad in ("", None, "javascript:alert(1)", "ftp://x", "shop.example/sale", 42):
        with pytest.raises(links.LinkError):
            links.target_url(bad)


def test_the_base_url_must_be_http_without_query():
    assert links.check_base("https://s.example.ru/") == "https://s.example.ru"
    for bad in (None, "", "s.example.ru", "https://s.example.ru/?a=1", "ftp://s.example.ru"):
        with pytest.raises(links.LinkError):
            links.check_base(bad)


@pytest.mark.parametrize("ua", [
    "TelegramBot (like TwitterBot)",
    "WhatsApp/2.23.20.0 A",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Twitterbot/1.0",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/W.X.Y.Z Mobile Safari/537.36 (compatible; Google-PageRenderer; "
    "+https://developers.google.com/search/docs/crawling-indexing/google-special-case-crawlers)",
])
def test_previews_and_crawlers_are_not_people(ua):
    assert links.bot_reason("GET", ua) == "crawler"


def test_people_and_heads():
    phone = ("Mozilla/5.0 (Linux; Android 14; SM-A546B) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/126.0.0.0 Mobile Safari/537.36")
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
              "Version/17.5 Mobile/15E148 Safari/604.1")
    assert links.bot_reason("GET", phone) is None and links.bot_reason("GET", iphone) is None
    assert links.bot_reason("HEAD", phone) == "head"
    assert links.bot_reason("GET", None) == links.bot_reason("GET", "  ") == "no_user_agent"


def test_the_ip_key_is_kept_in_the_data_dir_and_the_hash_hides_the_ip(tmp_path):
    k1 = links.click_ip_key(None, tmp_path)
    assert links.click_ip_key(None, tmp_path) == k1 and (tmp_path / "click-ip.key").stat().st_mode & 0o077 == 0
    assert links.click_ip_key("configured", tmp_path) == b"configured"
    h = links.ip_hash("203.0.113.7", k1)
    assert len(h) == 32 and set(h) <= set("0123456789abcdef")  # a hash, not the address in any form
    assert h == links.ip_hash("203.0.113.7", k1) != links.ip_hash("203.0.113.8", k1)
    assert h != links.ip_hash("203.0.113.7", b"another key")
