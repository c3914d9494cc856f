"""Codec plugins, loaded by name from the `cloudlet.codecs` entry-point namespace."""

import logging

from stevedore import driver, extension
from stevedore.exception import NoMatches

from cloudlet.codecs.base import Codec, NullCodec
from cloudlet.errors import UnsupportedFormat

LOG = logging.getLogger(__name__)
NAMESPACE = "cloudlet.codecs"

__all__ = ["Codec", "NullCodec", "available_codecs", "get_codec"]


def available_codecs() -> list[str]:
    """Names of the installed codec plugins (the built-in "none" is not listed)."""
    mgr = extension.ExtensionManager(NAMESPACE, invoke_on_load=False)
    return sorted(mgr.names())


def get_codec(name: str, level: int | None = None) -> Codec:
    """A codec instance by plugin name; UnsupportedFormat names the installed ones."""
    if name == NullCodec.name:
        return NullCodec(level)
    try:
        mgr = driver.DriverManager(NAMESPACE, name, invoke_on_load=False)
    except NoMatches:
        raise UnsupportedFormat(
            f"unknown codec {name!r}; installed codecs: {', '.join(available_codecs())}"
        ) from None
    return mgr.driver(level)
