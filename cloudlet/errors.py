"""One hierarchy of errors, each with a message a user can act on."""


class CloudletError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigMismatch(CloudletError):
    """A VM configuration differs from the one a memory snapshot was saved with."""


class HostCannotResume(ConfigMismatch):
    """This host's QEMU cannot resume a snapshot (machine type, device or QEMU too old)."""


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


class SourceError(CloudletError):
    """An overlay source (file, URL, upload, Glance image) cannot be opened or read."""


class SourceNotAllowed(SourceError):
    """An overlay URL is outside the allow-list (or carries credentials)."""


class VerificationFailed(CloudletError):
    """A synthesized image does not have the digest the overlay promises."""


class SynthesisTimeout(CloudletError):
    """The overlay did not finish arriving and applying within the allowed time."""


class AccessTraceError(CloudletError):
    """An access trace is malformed, or names chunks the overlay it should order cannot have."""


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


class ServerError(CloudletError):
    """The synthesis server refused a request, or a synthesis it runs failed."""


class ServerBusy(ServerError):
    """The server already runs as many syntheses as it was started to allow."""


class SynthesisNotFound(ServerError):
    """No synthesis with that id on this server (finished and deleted, or never made)."""


class FilesystemError(CloudletError):
    """The early-start filesystem (cloudletfs) could not be mounted, unmounted or served."""


class FetchTimeout(FilesystemError):
    """A chunk the guest needs did not arrive within the fetch deadline."""
