"""Where callbacks may go: well-formed http(s) URLs of public addresses, or of networks the operator allows.

The platform would otherwise POST for anyone to its own loopback, its cloud's metadata service or its private
network (server-side request forgery). A URL is checked when a job is submitted; its host name, whose answer
may change, is checked again at delivery on every address it resolves to, and only those are connected to.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2048
FORBIDDEN: tuple[tuple[Network, str], ...] = tuple((ipaddress.ip_network(cidr), kind) for cidr, kind in (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "private"),  # shared by carrier-grade NATs
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # the cloud metadata services live here
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "reserved"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),
    ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "private"),
    ("ff00::/8", "multicast"),
    ("2001::/23", "reserved"),
    ("2001:db8::/32", "reserved"),
    ("2002::/16", "reserved"),
    ("3fff::/20", "reserved"),
))
"""Ranges no callback goes to unless CALLBACK_ALLOW_NETWORKS names them, with what each is."""
GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
"""Outside it (and the forbidden ranges), an IPv6 address is reserved."""
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""IPv6 addresses that a NAT64 gateway translates to the IPv4 address in their last 32 bits."""
NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]*))*")
"""A host all of whose labels are numbers: an IPv4 address, in one of the forms the C library also reads."""
HOST_NAME = re.compile(r"[a-z0-9_.-]+")


class RefusedDestination(ValueError):
    """A callback URL or address the platform does not send to; the message says why."""


def networks(text: str) -> tuple[Network, ...]:
    """Parse CALLBACK_ALLOW_NETWORKS: networks in CIDR form (or single addresses) separated by commas."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"CALLBACK_ALLOW_NETWORKS: {item!r} is not a network such as 10.0.0.0/8") from None
    return tuple(found)


def forbidden_kind(address: Address) -> str | None:
    """What kind of non-public address this is (loopback, private, ...); None for a public one."""
    address = embedded_ipv4(address) or address
    for network, kind in FORBIDDEN:
        if address in network:
            return kind
    if address.version == 6 and address not in GLOBAL_UNICAST:
        return "reserved"
    return None


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, or NAT64's well-known prefix); None otherwise."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None


@dataclass(frozen=True)
class Destinations:
    """The policy: public addresses, and those of the `allowed` networks."""

    allowed: tuple[Network, ...] = ()

    def check_url(self, url: str) -> urllib.parse.SplitResult:
        """Refuse a URL that is malformed or names a forbidden address literally; answer its parts.

        A host name is not resolved here (its answer may change before delivery): see `check_address`.
        """
        parts = split(url)
        if ip_literal(parts.hostname or "") is not None:
            self.check_address(parts.hostname or "")
        return parts

    def check_address(self, text: str) -> None:
        """Refuse an IP address in a forbidden range, unless an allowed network holds it."""
        address = ipaddress.ip_address(text)
        kind = forbidden_kind(address)
        if kind is not None and not self.allows(address):
            raise RefusedDestination(f"points to {text}, which is not a public address ({kind})")

    def allows(self, address: Address) -> bool:
        """Whether an allowed network holds the address (or the IPv4 address it stands for)."""
        candidates = [a for a in (address, embedded_ipv4(address)) if a is not None]
        return any(a in network for network in self.allowed for a in candidates)


def split(url: str) -> urllib.parse.SplitResult:
    """Check a URL's form: absolute http(s), a plain host, no user info, no spaces or control characters."""
    if len(url) > MAX_URL_CHARS:
        raise RefusedDestination(f"is longer than {MAX_URL_CHARS} characters")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise RefusedDestination("must not contain spaces, line breaks or other control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # an unclosed IPv6 bracket, a port out of range
        raise RefusedDestination(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RefusedDestination("must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise RefusedDestination("must not carry user info (user:password@)")
    check_host(parts.hostname or "")
    if port == 0:
        raise RefusedDestination("must not name port 0")
    return parts


def check_host(host: str) -> None:
    """Refuse a host that is neither an IP address in standard form nor a plain ASCII host name."""
    if not host:
        raise RefusedDestination("must name a host")
    if ip_literal(host) is None and not HOST_NAME.fullmatch(host):
        raise RefusedDestination(f"has host {host!r}; use letters, digits, '.' and '-' (IDNA 'xn--' form)")


def ip_literal(host: str) -> Address | None:
    """The IP address a URL's host is, or None for a host name; numbers in any other form are refused."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host or NUMERIC_HOST.fullmatch(host):
        raise RefusedDestination(f"has host {host}, which is not an IP address in standard form")
    return None
