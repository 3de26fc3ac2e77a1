"""Keep downloads away from internal networks: classify addresses, refuse at connect time.

The check lives in the HTTP client's network backend, not in a look-up before the
request: the backend resolves the host itself, checks every address it got, and then
connects to one of those checked addresses. A DNS answer that changes between a
pre-check and the connect (DNS rebinding) therefore cannot slip through, redirects are
checked hop by hop for free, and a refused target never sees a single packet. TLS still
verifies the certificate against the URL's hostname (httpcore passes it as SNI).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpcore
import httpx

from throttler.hosts import IPAddress, ip_literal
from throttler.logs import fields
from worker.taskkit.errors import PermanentError

log = logging.getLogger("worker.netguard")


class AddressClass(StrEnum):
    """Why an address is not on the public internet."""

    UNSPECIFIED = "unspecified"  # 0.0.0.0 / :: ; connecting to it reaches this host
    LOOPBACK = "loopback"  # 127.0.0.0/8, ::1
    LINK_LOCAL = "link-local"  # 169.254.0.0/16 (cloud metadata), fe80::/10
    MULTICAST = "multicast"  # 224.0.0.0/4, ff00::/8
    PRIVATE = "private"  # RFC 1918, fc00::/7, shared and documentation ranges
    RESERVED = "reserved"  # 240.0.0.0/4 and other IETF-reserved ranges


# What DOWNLOAD_ALLOW_PRIVATE admits on trusted networks; the rest is never a web server.
TRUSTED_NETWORK_CLASSES = frozenset(
    {AddressClass.LOOPBACK, AddressClass.LINK_LOCAL, AddressClass.PRIVATE}
)


def classify(address: IPAddress) -> AddressClass | None:
    """Return why ``address`` is not public, or None for a global unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address it carries.
        address = address.ipv4_mapped
    if address.is_unspecified:
        return AddressClass.UNSPECIFIED
    if address.is_loopback:
        return AddressClass.LOOPBACK
    if address.is_link_local:
        return AddressClass.LINK_LOCAL
    if address.is_multicast:
        return AddressClass.MULTICAST
    if address.is_reserved:
        return AddressClass.RESERVED
    if address.is_private or not address.is_global:
        # Not global yet not flagged private, e.g. 100.64.0.0/10 (carrier-grade NAT).
        return AddressClass.PRIVATE
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class AddressPolicy:
    """Which addresses a download may connect to."""

    allow_private: bool = False

    def refusal(self, address: IPAddress) -> AddressClass | None:
        """Return the class that forbids ``address``, or None if it may be used."""
        found = classify(address)
        if found is None or (self.allow_private and found in TRUSTED_NETWORK_CLASSES):
            return None
        return found


class AddressRefused(PermanentError):
    """The target host resolves to an address the policy forbids."""

    def __init__(self, *, host: str, address: IPAddress, address_class: AddressClass) -> None:
        # The submitter reads this as the task's error: never what a name resolves to, nor
        # its kind, or the error would map the internal network for them. The worker's
        # log line (check_addresses) keeps both for the operator.
        super().__init__(f"refused to connect to {host}: its address is not allowed")
        self.host = host
        self.address = address
        self.address_class = address_class


def check_addresses(host: str, addresses: Iterable[IPAddress], policy: AddressPolicy) -> None:
    """Raise AddressRefused if any address of ``host`` is forbidden."""
    for address in addresses:
        found = policy.refusal(address)
        if found is not None:
            log.info(
                "download.address_refused",
                extra=fields(
                    host=host,
                    address=str(address),
                    address_class=found.value,
                    allowed_by_download_allow_private=found in TRUSTED_NETWORK_CLASSES,
                ),
            )
            raise AddressRefused(host=host, address=address, address_class=found)


async def resolve(host: str, port: int, *, timeout_s: float | None) -> list[IPAddress]:
    """Return the addresses of ``host`` in resolver order, without duplicates.

    An IP literal in any spelling is its own address, read by the function that gives
    ``host:`` limits their key: the address connected to is the one the limit named.
    """
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
    except TimeoutError as error:
        raise httpcore.ConnectTimeout(f"resolving {host} timed out") from error
    except OSError as error:
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses the policy allows."""

    def __init__(
        self, *, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port, timeout_s=timeout)
        # Every address, not just the first: the resolver's order is the attacker's choice.
        check_addresses(host, addresses, self._policy)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last_error = error
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("downloads may not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with every connection made through a GuardedBackend."""

    def __init__(self, *, policy: AddressPolicy, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(trust_env=False, limits=limits)
        # httpx has no public hook for the network backend, so replace the pool it built
        # with the same one plus our backend (httpx is pinned <1; the download tests
        # fail if this stops taking effect).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy=policy),
        )


def guarded_client(*, policy: AddressPolicy, timeout_s: float) -> httpx.AsyncClient:
    """Create the worker's download client: guarded, no redirects followed, no env proxies."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy=policy),
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        # A proxy from the environment would be the only host checked, not the target.
        trust_env=False,
    )
