"""One host key per address: every spelling the resolver accepts folds to one key."""

from __future__ import annotations

import ipaddress
import itertools
import socket

import pytest

from throttler.catalog import DownloadInput
from throttler.hosts import host_key, ip_literal, url_host_key

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "0177.0.0.1",
    "0x7f.1",
    "0177.0x0.0.01",
    "127.0.0.1.",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::FFFF:7F00:0001]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_every_spelling_of_an_ipv4_address_is_one_key(spelling: str) -> None:
    assert host_key(spelling) == "127.0.0.1"


@pytest.mark.parametrize(
    "spelling", ["[::1]", "[0:0::1]", "[0000::0001]", "::1", "0:0:0:0:0:0:0:1"]
)
def test_ipv6_is_compressed_lower_case_in_brackets(spelling: str) -> None:
    assert host_key(spelling) == "[::1]"


def test_ipv6_keeps_its_own_address() -> None:
    assert host_key("[2001:DB8:0:0::A]") == "[2001:db8::a]"
    # IPv4-compatible (deprecated) is not IPv4-mapped: a different address.
    assert host_key("[::127.0.0.1]") == "[::7f00:1]"


@pytest.mark.parametrize(
    ("name", "key"),
    [("Example.COM.", "example.com"), ("a-b_c.example", "a-b_c.example"), ("x1.y2.z", "x1.y2.z")],
)
def test_names_fold_case_and_the_trailing_dot(name: str, key: str) -> None:
    assert host_key(name) == key


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("[fe80::1%eth0]", "zone ids"),
        ("fe80::1%25eth0", "zone ids"),
        ("[::g]", "not an IPv6 address"),
        ("[127.0.0.1]", "not an IPv6 address"),
        ("1.2.3.256", "ends in a number"),
        ("4294967296", "ends in a number"),
        ("1.16777216", "ends in a number"),
        ("08.0.0.1", "ends in a number"),
        ("example.0x", "ends in a number"),
        ("", "empty"),
    ],
)
def test_invalid_hosts_are_refused(host: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        host_key(host)
    assert ip_literal(host) is None


def _candidates() -> list[str]:
    """Numeric-looking strings in many shapes: parts of every base, sizes at the edges."""
    parts = [
        "0",
        "1",
        "07",
        "08",
        "010",
        "0x",
        "0x0",
        "0xff",
        "0x100",
        "255",
        "256",
        "65535",
        "65536",
        "16777215",
        "16777216",
        "4294967295",
        "4294967296",
        "0xffffffff",
        "00377",
    ]
    shapes = [p for p in parts]
    shapes += [".".join(pair) for pair in itertools.product(parts[:10], parts)]
    shapes += (
        [f"1.2.{p}" for p in parts]
        + [f"1.2.3.{p}" for p in parts]
        + [f"1.2.3.4.{p}" for p in parts]
    )
    shapes += ["", ".", "1.", ".1", "1..2", "0x1g", "1e5", "-1", "+1"]
    return shapes


def _resolver_reads(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def test_ipv4_spellings_are_read_as_the_c_library_reads_them() -> None:
    # The key must name what the resolver connects to: compare with inet_aton itself
    # (getaddrinfo's numeric path) over every shape of number we can think of.
    for text in _candidates():
        ours = ip_literal(text) if text and not text.endswith(".") else None
        assert ours == _resolver_reads(text), text


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("http://EXAMPLE.com./x", "example.com"),
        ("https://b\u00fccher.example/", "xn--bcher-kva.example"),
        ("http://[::1]:8080/", "[::1]"),
        ("http://[0:0::1]/", "[::1]"),
        ("http://user:pw@Example.COM:81/", "example.com"),
        ("http://127.1/", "127.0.0.1"),
        ("http://2130706433:80/", "127.0.0.1"),
        ("http://0x7f000001/", "127.0.0.1"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),
        ("http://[::ffff:7f00:1]/", "127.0.0.1"),
    ],
)
def test_a_download_is_keyed_by_the_address_its_url_reaches(url: str, key: str) -> None:
    assert url_host_key(url) == key
    assert DownloadInput(url=url).limit_host() == key


@pytest.mark.parametrize(
    "url", ["http://1.2.3.256/", "http://host.123/", "http://[fe80::1%25eth0]/"]
)
def test_a_url_whose_host_is_no_address_and_no_name_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host"):
        DownloadInput(url=url)
