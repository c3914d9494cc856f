"""Where overlays come from: plugins by URL scheme, loaded from `cloudlet.overlay_sources`.

open_source("x.overlay") and open_source("file:///x.overlay") read a local file;
open_source("https://host/x.overlay", allow=...) fetches by HTTP Range; "glance://<id>" needs the
Nova side's downloader. Remote URLs must pass an AllowList, and without one none does.
"""

import logging
import os
import re

from stevedore import driver, extension
from stevedore.exception import NoMatches

from cloudlet.errors import SourceError
from cloudlet.sources.allow import AllowList
from cloudlet.sources.base import OverlaySource, SourcePlugin
from cloudlet.sources.stream import StreamSource

LOG = logging.getLogger(__name__)
NAMESPACE = "cloudlet.overlay_sources"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

__all__ = [
    "AllowList",
    "OverlaySource",
    "StreamSource",
    "available_schemes",
    "open_source",
    "scheme_of",
]


def available_schemes() -> list[str]:
    """URL schemes of the installed source plugins."""
    mgr = extension.ExtensionManager(NAMESPACE, invoke_on_load=False)
    return sorted(mgr.names())


def scheme_of(location: str | os.PathLike[str]) -> str:
    """The plugin name for a location: the URL scheme in lower case, or "file" for paths."""
    if isinstance(location, os.PathLike):
        return "file"
    match = _SCHEME.match(location)
    # "name:thing" is a relative path; only "scheme://..." (and "file:/path") are URLs.
    if match is None or not location[match.end() :].startswith("//"):
        return "file"
    return match.group(1).lower()


def open_source(
    location: str | os.PathLike[str], *, allow: AllowList | None = None, timeout: float = 30.0
) -> OverlaySource:
    """The overlay at `location`, opened (and for remote ones, reached once) or SourceError.

    `allow` None allows local files only; a server passes its configured AllowList.parse(...),
    and only a user's own command line may pass AllowList.any().
    """
    scheme = scheme_of(location)
    try:
        mgr = driver.DriverManager(NAMESPACE, scheme, invoke_on_load=False)
    except NoMatches:
        raise SourceError(
            f"cannot open overlay {location}: no source plugin for {scheme}:// "
            f"(installed: {', '.join(available_schemes())})"
        ) from None
    plugin: SourcePlugin = mgr.driver
    source = plugin.from_location(os.fspath(location), allow=allow, timeout=timeout)
    LOG.debug("opened overlay source %r", source)
    return source
