"""Who may talk to smd's web servers (`smd paint` and `smd stream --preview`): one Host and Origin rule.

A server on 127.0.0.1 can be reached by any page the user's browser opens. Two checks keep other
sites out, for every request and WebSocket:

- **Host.** A request must name the server by a name it was started for: the loopback names, or
  the `--host` given (for a wildcard address, this machine's own names and addresses), with the
  port it listens on. A page that re-resolves its own domain to 127.0.0.1 (DNS rebinding) reaches
  the server as `Host: its-domain:port` and is refused, though the browser thinks it same-origin.
- **Origin.** A request that says which page sent it (browsers send `Origin` with every WebSocket
  and every POST) must come from a page of this server under one of those names. It is compared
  with the names the server was started for, never with the Host the request claims.

A request without an Origin is not a page's (a script or a command-line client on this machine,
or a plain page load), and passes the second check.

Starlette's TrustedHostMiddleware checks host names only; the rule here also checks the port and
the Origin. Both servers apply it through `Guard` (`smd_cli.app.web.server`). No torch at import.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Access:
    """The names (lower case, IPv6 addresses without brackets) and the port a server answers to."""

    names: frozenset[str]
    port: int

    def host_ok(self, header: str | None) -> bool:
        """Whether a Host header names this server."""
        parsed = _authority(header)
        return parsed is not None and parsed[0] in self.names and parsed[1] == self.port

    def origin_ok(self, header: str | None) -> bool:
        """Whether an Origin header is one of this server's pages (no header: not a page's request)."""
        if header is None:
            return True
        try:
            parts = urlsplit(header.strip())
        except ValueError:
            return False
        if parts.scheme != "http" or parts.path or parts.query or parts.fragment or parts.username:
            return False
        return self.host_ok(parts.netloc)

    @property
    def origins(self) -> list[str]:
        """The pages this server accepts, as `http://name:port`."""
        return [f"http://{_bracketed(name)}:{self.port}" for name in sorted(self.names)]


def access_for(host: str, port: int) -> Access:
    """The names a server bound to `host` (as given to --host or --preview) answers to, at `port`."""
    names = {name.lower() for name in LOOPBACK_NAMES}
    host = host.strip().strip("[]").lower()
    if host in WILDCARD_HOSTS:
        names |= machine_names()
    else:
        names.add(host)
    return Access(frozenset(names), port)


def url_for(host: str, port: int) -> str:
    """The address to give a person for a server bound to `host`: a wildcard as this machine's
    loopback address, so that the address printed is one the server answers to."""
    name = host.strip().strip("[]")
    if name in WILDCARD_HOSTS:
        name = "::1" if name == "::" else "127.0.0.1"
    return f"http://{_bracketed(name)}:{port}/"


def is_loopback(host: str) -> bool:
    return host.strip().strip("[]").lower() in LOOPBACK_NAMES


def machine_names() -> set[str]:
    """This machine's host names and the addresses they resolve to: what others call it by."""
    names: set[str] = set()
    for name in {socket.gethostname(), socket.getfqdn()}:
        if not name:
            continue
        names.add(name.lower())
        try:
            names |= {info[4][0].lower() for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError):  # a name that does not resolve: the name alone
            pass
    return {n.split("%")[0] for n in names}  # IPv6 scope ids are not part of a Host header


def _authority(header: str | None) -> tuple[str, int] | None:
    """(name, port) of `name:port`, `[v6]:port` or `name` (port 80), or None if malformed."""
    if not header:
        return None
    text = header.strip().lower()
    if text.startswith("["):
        name, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else ""
    else:
        name, _, port = text.partition(":")
        if ":" in port:
            return None
    if not name:
        return None
    if not port:
        return name, 80
    if not port.isdigit() or len(port) > 5:
        return None
    return name, int(port)


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def describe(access: Access, limit: int = 6) -> str:
    """The accepted pages, for the message said when a server listens beyond this machine."""
    shown: Iterable[str] = access.origins[:limit]
    more = len(access.origins) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
