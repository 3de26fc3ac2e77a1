"""One key per host for ``host:`` limits: every spelling of an IP address folds to one.

A host limit must hold however the submitter spells the address: ``127.1``,
``2130706433``, ``0x7f000001`` and ``[::ffff:127.0.0.1]`` all reach 127.0.0.1, so they
share its key. The key is:

- IPv4, in every form the C library's ``inet_aton`` (and so ``getaddrinfo``) accepts:
  1 to 4 parts, each decimal, octal (leading ``0``) or hex (``0x``), the last part filling
  the remaining bytes: the dotted quad, ``127.0.0.1``;
- IPv6: compressed, lower case, in brackets, ``[::1]``; an IPv4-mapped address
  (``::ffff:127.0.0.1``, ``::ffff:7f00:1``) is the IPv4 address it carries, since a
  connection to it reaches that IPv4 address; zone ids (``fe80::1%eth0``) are refused;
- a name: lower case, without a trailing dot (IDNA-encoded by httpx before it gets here).
  A name whose last label is a number (``1.2.3.256``, ``10.0x``) is refused, as the
  WHATWG URL standard does: a resolver might read it as an address.

The intake (``tasks.host``), the ``RELAY_LIMITS`` parser, the worker's redirect hops and
its network guard all call this module, so the key always names the address the worker
actually connects to (worker.netguard connects to ``ip_literal(host)`` for literals).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# inet_aton's numbers: hex needs a digit after 0x (glibc refuses a bare "0x"), a leading 0
# means octal, and nothing else is allowed (no sign, no space, no empty part).
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
# WHATWG's "ends in a number": the last label is all digits, or 0x followed by hex digits.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``text`` spells in inet_aton's grammar, or None."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    numbers = [_c_integer(part) for part in parts]
    *head, last = numbers
    if any(number > 0xFF for number in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = 0
    for number in head:
        value = value << 8 | number
    return ipaddress.IPv4Address(value << (8 * (4 - len(head))) | last)


def _c_integer(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        return int(part[2:], 16)
    if part.startswith("0"):
        return int(part, 8)
    return int(part, 10)


def _ipv6(text: str) -> IPAddress:
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids are not supported")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv6 address") from None
    # ::ffff:a.b.c.d is how a dual-stack socket reaches the IPv4 address a.b.c.d.
    return address.ipv4_mapped or address


def parse_host(host: str) -> IPAddress | str:
    """Return the address an IP literal names, or the folded name; ValueError if neither.

    ``host`` is a URL's host as httpx gives it (``raw_host``: IPv6 without brackets) or
    as written in a rule (IPv6 in brackets).
    """
    text = host[:-1] if host.endswith(".") else host
    if text.startswith("[") and text.endswith("]"):
        return _ipv6(text[1:-1])
    if ":" in text:
        return _ipv6(text)
    address = _inet_aton(text)
    if address is not None:
        return address
    last_label = text.rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.fullmatch(last_label):
        raise ValueError(f"{host!r} ends in a number but is not a valid IPv4 address")
    if not text:
        raise ValueError("the host is empty")
    return text.lower()


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any spelling; None for a name or no valid host."""
    try:
        parsed = parse_host(host)
    except ValueError:
        return None
    return None if isinstance(parsed, str) else parsed


@lru_cache(maxsize=4096)
def host_key(host: str) -> str:
    """The ``host:`` key of a host: dotted quad, ``[compressed IPv6]`` or folded name.

    Raises ValueError for a host that is neither a valid address nor a name.
    """
    parsed = parse_host(host)
    if isinstance(parsed, ipaddress.IPv6Address):
        return f"[{parsed.compressed}]"
    return str(parsed)


def url_host_key(url: str | httpx.URL) -> str:
    """The ``host:`` key of a URL's host, as the worker's HTTP client will contact it.

    Raises ValueError for a URL without a valid host.
    """
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(str(error)) from None
    return host_key(parsed.raw_host.decode("ascii"))
