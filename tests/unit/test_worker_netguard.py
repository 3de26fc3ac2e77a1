"""The download address guard: classification table, policy, and refusal before connecting."""

from __future__ import annotations

import ipaddress
import logging

import httpcore
import pytest

from throttler.hosts import host_key
from worker.netguard import (
    AddressClass,
    AddressPolicy,
    AddressRefused,
    GuardedBackend,
    check_addresses,
    classify,
    resolve,
)

TABLE: list[tuple[str, AddressClass | None]] = [
    # Public: allowed.
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    # Unspecified: connecting to it reaches this host.
    ("0.0.0.0", AddressClass.UNSPECIFIED),
    ("::", AddressClass.UNSPECIFIED),
    # Loopback, including IPv4-mapped IPv6.
    ("127.0.0.1", AddressClass.LOOPBACK),
    ("127.255.255.254", AddressClass.LOOPBACK),
    ("::1", AddressClass.LOOPBACK),
    ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
    # Link-local, the cloud metadata address among them.
    ("169.254.169.254", AddressClass.LINK_LOCAL),
    ("fe80::1", AddressClass.LINK_LOCAL),
    ("::ffff:169.254.169.254", AddressClass.LINK_LOCAL),
    # Private and otherwise non-global.
    ("10.0.0.1", AddressClass.PRIVATE),
    ("172.16.5.4", AddressClass.PRIVATE),
    ("192.168.1.1", AddressClass.PRIVATE),
    ("::ffff:10.1.2.3", AddressClass.PRIVATE),
    ("fc00::1", AddressClass.PRIVATE),
    ("fd12:3456::1", AddressClass.PRIVATE),
    ("100.64.0.1", AddressClass.PRIVATE),
    ("192.0.2.10", AddressClass.PRIVATE),
    ("2001:db8::1", AddressClass.PRIVATE),
    # Multicast and reserved.
    ("224.0.0.1", AddressClass.MULTICAST),
    ("239.255.255.250", AddressClass.MULTICAST),
    ("ff02::1", AddressClass.MULTICAST),
    ("240.0.0.1", AddressClass.RESERVED),
    ("255.255.255.255", AddressClass.RESERVED),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_classify(text: str, expected: AddressClass | None) -> None:
    assert classify(ipaddress.ip_address(text)) == expected


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_default_policy_refuses_every_non_public_address(
    text: str, expected: AddressClass | None
) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(text)) == expected


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_trusted_policy_still_refuses_unspecified_multicast_reserved(
    text: str, expected: AddressClass | None
) -> None:
    always = {AddressClass.UNSPECIFIED, AddressClass.MULTICAST, AddressClass.RESERVED}
    refusal = AddressPolicy(allow_private=True).refusal(ipaddress.ip_address(text))
    assert refusal == (expected if expected in always else None)


def test_one_bad_address_among_good_ones_refuses_the_host() -> None:
    addresses = [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")]
    with pytest.raises(AddressRefused) as refused:
        check_addresses("mixed.example", addresses, AddressPolicy())
    assert refused.value.address == ipaddress.ip_address("10.0.0.1")
    assert refused.value.address_class is AddressClass.PRIVATE


def test_the_refusal_says_only_that_the_address_is_not_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The task's error is read by the submitter: it must not tell what an internal name
    # resolves to, nor what kind of address it is. The operator's log keeps both.
    addresses = [ipaddress.ip_address("10.1.2.3")]
    with (
        caplog.at_level(logging.INFO, logger="worker.netguard"),
        pytest.raises(AddressRefused) as refused,
    ):
        check_addresses("intranet.example", addresses, AddressPolicy())
    message = str(refused.value)
    assert message == "refused to connect to intranet.example: its address is not allowed"
    assert "10.1.2.3" not in message
    assert "private" not in message
    [record] = [r for r in caplog.records if r.getMessage() == "download.address_refused"]
    assert record.levelno >= logging.INFO
    logged = vars(record)["fields"]
    assert (logged["address"], logged["address_class"]) == ("10.1.2.3", "private")


@pytest.mark.parametrize(
    "spelling",
    ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "::ffff:127.0.0.1", "127.0.0.1."],
)
async def test_every_ip_spelling_connects_to_the_address_its_host_key_names(spelling: str) -> None:
    # The host: limit keyed the task on host_key(spelling): the guard must connect there.
    addresses = await resolve(spelling, 80, timeout_s=1.0)
    assert [str(address) for address in addresses] == [host_key(spelling)]


async def test_ip_literal_is_not_looked_up() -> None:
    assert await resolve("::1", 80, timeout_s=1.0) == [ipaddress.ip_address("::1")]


async def test_localhost_resolves_to_loopback_only() -> None:
    addresses = await resolve("localhost", 80, timeout_s=5.0)
    assert addresses
    assert {classify(address) for address in addresses} == {AddressClass.LOOPBACK}


async def test_backend_refuses_before_connecting() -> None:
    class NoConnect(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, *args: object, **kwargs: object) -> httpcore.AsyncNetworkStream:
            raise AssertionError("the guard let a refused address through")

    backend = GuardedBackend(policy=AddressPolicy(), inner=NoConnect())
    with pytest.raises(AddressRefused) as refused:
        await backend.connect_tcp("localhost", 8080, timeout=5.0)
    assert refused.value.address_class is AddressClass.LOOPBACK
