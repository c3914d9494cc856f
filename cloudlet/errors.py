"""One hierarchy of errors, each with a message a user can act on."""


class CloudletError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigMismatch(CloudletError):
    """A VM configuration differs from the one a memory snapshot was saved with."""


class MemoryStreamError(CloudletError):
    """A QEMU migration stream (or libvirt save file) is malformed or uses an unknown feature."""


class OverlayError(CloudletError):
    """An overlay cannot be used."""


class CorruptOverlay(OverlayError):
    """A digest in the overlay does not match its content (flipped bit, tampering)."""


class TruncatedOverlay(OverlayError):
    """The overlay ends before the data its header and manifest promise."""


class UnsupportedFormat(OverlayError):
    """Not an overlay, or an overlay format version this engine does not read."""


class WrongBase(OverlayError):
    """The overlay was made against a base VM other than the one offered."""


class VerificationFailed(CloudletError):
    """A synthesized image does not have the digest the overlay promises."""


class BaseVMError(CloudletError):
    """A base VM is missing, incomplete, or its files do not match their digests."""


class BaseNotFound(BaseVMError):
    """No base VM with that id (or unique id prefix) in the registry."""


class BasePackageError(BaseVMError):
    """A base VM package is malformed, truncated, or fails its digests."""


class HypervisorError(CloudletError):
    """QEMU failed to start, died, or refused a command."""


class GuestTimeout(HypervisorError):
    """The guest did not reach the expected state within the allowed time."""


class BaseExists(BaseVMError):
    """A base VM with the same id (the same contents) is already registered."""


class AmbiguousBase(BaseVMError):
    """A name or id prefix matches more than one registered base VM."""


class ImageError(CloudletError):
    """A disk or memory image is unreadable, shorter than expected, or laid out unexpectedly."""


class GuestCommandFailed(HypervisorError):
    """A shell command run in the guest (over its serial console) exited non-zero."""

    def __init__(self, message: str, returncode: int, output: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output
