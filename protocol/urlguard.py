"""Which webhook URLs tokenq may call: http(s) to public addresses only, unless allow-listed.

A webhook is a request our servers send to a URL a client chose, so without this check a client could
make them call Redis, a cloud metadata endpoint or anything else on the private network (SSRF). The
gateway checks the URL's syntax (and a literal IP) at submit; the delivery worker resolves the name
before every attempt, checks every address, and connects to the checked one so a DNS answer cannot
change in between. `TOKENQ_WEBHOOK_ALLOW` (comma-separated CIDRs or exact host names; Settings.webhook_allow,
which the callers pass as `allow`) opens holes, e.g. for a receiver on the same machine in development.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_ENV = "TOKENQ_WEBHOOK_ALLOW"  # named in errors; tokenq/settings.py reads it
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the IPv4 is the low 32 bits
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible form, ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT's IPv4-translated form, ::ffff:0:a.b.c.d
# Never public, whatever they embed: local-use NAT64 (RFC 8215) reaches a private IPv4 network by
# definition, and site-local addresses (deprecated, RFC 3879) are the old private range, which Python
# still calls global.
_NEVER_PUBLIC_V6 = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


class UnsafeURL(ValueError):
    """The URL is not one tokenq will deliver to; the message says why. A name's resolved address stays out
    of the message, which reaches the tenant (it would map the private network for them); `address` holds it
    for the operator's log."""

    def __init__(self, message: str, address: IPAddress | None = None) -> None:
        super().__init__(message)
        self.address = address


class HostNotFound(UnsafeURL):
    """The host did not resolve: maybe a passing DNS failure, so delivery retries it later."""


class AllowList:
    """Parsed `TOKENQ_WEBHOOK_ALLOW`: networks and host names (lower case, exact match)."""

    def __init__(self, spec: str | None) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for item in (spec or "").split(","):
            item = item.strip().lower().rstrip(".")
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item)

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches when it embeds one (mapped, compatible, translated, NAT64,
    6to4), else None. Teredo is left out: its range is not global, so it is refused as a whole."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _IPV4_COMPATIBLE or addr in _IPV4_TRANSLATED or addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(addr: IPAddress) -> bool:
    """Globally routable unicast. An IPv6 address that embeds an IPv4 one is judged by the IPv4 one,
    since the packets end up there."""
    if addr.is_multicast:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _NEVER_PUBLIC_V6):
            return False
        inner = embedded_ipv4(addr)
        if inner is not None:
            return is_public(inner)
    return addr.is_global


def _bad_character(url: str) -> int | None:
    """Index of the first control character or space: urlsplit strips CR, LF and TAB silently, so a URL
    that passes here would not be the one an HTTP client later refuses or sends."""
    return next((i for i, c in enumerate(url) if ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F), None)


def _host(url: str) -> str:
    """The URL's host after the syntax checks (IPv6 literals without brackets)."""
    bad = _bad_character(url)
    if bad is not None:
        raise UnsafeURL(f"webhook URL must not contain a control character or space ({url[bad]!r} at "
                        f"character {bad})")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise UnsafeURL(f"malformed URL: {e}") from None
    if port == 0:
        raise UnsafeURL("malformed URL: port 0 is no port to deliver to")
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("webhook URL must be http or https")
    if "@" in parts.netloc:
        raise UnsafeURL("webhook URL must not carry a user name or password")
    if not parts.hostname:
        raise UnsafeURL("webhook URL has no host")
    return parts.hostname


def _literal(host: str) -> IPAddress | None:
    """The host as an IP address, a trailing dot aside ("127.0.0.1." names the same address)."""
    try:
        return ipaddress.ip_address(host.removesuffix("."))
    except ValueError:
        return None


def _check_address(addr: IPAddress, host: str, allowed: AllowList) -> None:
    if not is_public(addr) and not allowed.allows_address(addr):
        what = f"is a non-public address ({addr})" if _literal(host) else "resolves to a non-public address"
        raise UnsafeURL(f"webhook host {host} {what}; an operator may allow it with {ALLOW_ENV} on the gateway "
                        "and the webhook service", address=addr)


def _loopback_name(host: str) -> bool:
    """`localhost` and names under it are loopback by definition (RFC 6761): no need to resolve them."""
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def check_webhook_url(url: str, allow: str) -> None:
    """Syntax, and the address when the host is a literal IP or a loopback name; no name resolution (cheap,
    synchronous)."""
    host = _host(url)
    allowed = AllowList(allow)
    addr = ipaddress.ip_address("127.0.0.1") if _loopback_name(host) else _literal(host)
    if addr is not None and not allowed.allows_host(host):
        _check_address(addr, host, allowed)


def _checked(url: str, infos: list[str], allow: str) -> list[IPAddress]:
    host = _host(url)
    allowed = AllowList(allow)
    addrs = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in infos))
    if not addrs:
        raise HostNotFound(f"webhook host {host} did not resolve")
    if not allowed.allows_host(host):
        for addr in addrs:  # every one: a name with one private address among public ones is refused
            _check_address(addr, host, allowed)
    return addrs


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def resolve_public_sync(url: str, allow: str) -> list[IPAddress]:
    """Check the URL, resolve its host and return its addresses, all of them checked."""
    host = _host(url)
    try:
        infos = socket.getaddrinfo(host, _port(url), type=socket.SOCK_STREAM)
    except OSError as e:
        raise HostNotFound(f"webhook host {host} did not resolve: {e}") from None
    return _checked(url, [str(i[4][0]) for i in infos], allow)


async def resolve_public(url: str, allow: str) -> list[IPAddress]:
    """`resolve_public_sync` on the running loop's resolver."""
    host = _host(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, _port(url), type=socket.SOCK_STREAM)
    except OSError as e:
        raise HostNotFound(f"webhook host {host} did not resolve: {e}") from None
    return _checked(url, [str(i[4][0]) for i in infos], allow)
