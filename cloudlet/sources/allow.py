"""Which remote URLs a cloudlet may fetch overlays from (so a request cannot aim it anywhere).

Entries are "scheme://host[:port]/path-prefix". A URL passes when scheme, host and port (default
ports filled in) are equal and its normalised path lies under the prefix. Paths are normalised
("." and ".." resolved, repeated slashes merged) and the normalised URL is the one fetched, so
what is checked is what is requested; encoded dots, slashes, backslashes and percent signs are
refused rather than interpreted, since servers disagree about them (and some decode twice).
URLs carrying credentials (user@host) are refused everywhere: they would end up in logs and
error messages.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cloudlet.errors import SourceError, SourceNotAllowed

LOG = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
# "%25" is an encoded "%": "%252e" becomes "." at a server (or proxy) that decodes twice
_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c", "%25")


@dataclass(frozen=True)
class RemoteURL:
    """An http(s) URL split into the parts the allow-list compares, with its path normalised."""

    scheme: str
    host: str
    port: int
    path: str  # normalised, starts with "/"
    query: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def target(self) -> str:
        """The request target: path and query."""
        return self.path + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.target}"


def parse_remote_url(url: str) -> RemoteURL:
    """Split and normalise an http(s) URL; SourceNotAllowed for anything ambiguous."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise SourceNotAllowed(f"overlay URL {url!r} contains spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise SourceNotAllowed(f"overlay URL {url!r}: only http and https URLs can be fetched")
    if "@" in parts.netloc:
        raise SourceNotAllowed(
            f"overlay URL with credentials refused ({scheme}://...@{parts.netloc.rpartition('@')[2]}):"
            " put credentials in a pre-signed URL's query, never in user@host"
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise SourceNotAllowed(f"overlay URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise SourceNotAllowed(f"overlay URL {url!r} has an invalid port") from None
    return RemoteURL(scheme, host, port, _normalise_path(parts.path, url), parts.query)


def _normalise_path(path: str, url: str) -> str:
    lowered = path.lower()
    if "\\" in path or any(s in lowered for s in _ENCODED_SEPARATORS):
        raise SourceNotAllowed(
            f"overlay URL {url!r}: encoded '.', '/', '\\' or '%' in the path are refused "
            "(servers resolve them differently)"
        )
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise SourceNotAllowed(f"overlay URL {url!r}: '..' climbs above the root")
            segments.pop()
        else:
            segments.append(segment)
    ends_dir = path.endswith("/") or path.rsplit("/", 1)[-1] in (".", "..")
    trailing = "/" if segments and ends_dir else ""
    return "/" + "/".join(segments) + trailing


class AllowList:
    """The remote URLs a caller accepts; build with `parse()` (configured) or `any()` (local CLI).

    There is no way to get an allow-everything list by accident: `AllowList.parse([])` and
    `open_source(..., allow=None)` both allow no remote URL at all (local files only).
    """

    def __init__(self, entries: Iterable[RemoteURL], *, _any: bool = False) -> None:
        self._entries = tuple(entries)
        self._any = _any

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        """From configuration: "scheme://host[:port]/path-prefix" strings."""
        if isinstance(entries, str):
            raise TypeError("AllowList.parse takes a list of entries, not one string")
        parsed = []
        for entry in entries:
            try:
                url = parse_remote_url(entry.strip())
            except SourceNotAllowed as e:
                raise SourceError(f"invalid allow-list entry {entry!r}: {e}") from None
            if url.query:
                raise SourceError(f"invalid allow-list entry {entry!r}: no query allowed")
            parsed.append(url)
        return cls(parsed)

    @classmethod
    def any(cls) -> "AllowList":
        """Every http(s) URL: for a user's own command line, never for a server's requests."""
        return cls((), _any=True)

    def check(self, url: str) -> RemoteURL:
        """The normalised URL to fetch, or SourceNotAllowed."""
        parsed = parse_remote_url(url)
        if self._any or any(self._matches(entry, parsed) for entry in self._entries):
            return parsed
        LOG.warning("refused overlay URL %s: not in the allow-list", parsed)
        if not self._entries:
            raise SourceNotAllowed(
                f"overlay URL {parsed} refused: no remote sources are allowed here "
                "(configure an allow-list of URL prefixes)"
            )
        raise SourceNotAllowed(
            f"overlay URL {parsed} refused: not under any allowed prefix "
            f"({', '.join(str(e) for e in self._entries)})"
        )

    def allows(self, url: str) -> bool:
        try:
            self.check(url)
        except SourceNotAllowed:
            return False
        return True

    @staticmethod
    def _matches(entry: RemoteURL, url: RemoteURL) -> bool:
        if entry.origin != url.origin:
            return False
        prefix = entry.path
        if prefix.endswith("/"):
            return url.path.startswith(prefix)
        return url.path == prefix or url.path.startswith(prefix + "/")

    def __repr__(self) -> str:
        if self._any:
            return "AllowList.any()"
        return f"AllowList.parse({[str(e) for e in self._entries]!r})"
