"""Instance faults for cloudlet images.

Each is a nova.exception.ImageUnacceptable, which the compute manager turns into a build abort:
the instance goes to ERROR with this message as its fault and is not rescheduled (another host
would fail the same way, and the message says what to fix).
"""

from nova import exception


class CloudletImageUnacceptable(exception.ImageUnacceptable):
    msg_fmt = "Cloudlet image %(image_id)s is unacceptable: %(reason)s"


class CloudletImageInvalid(CloudletImageUnacceptable):
    msg_fmt = "Cloudlet image %(image_id)s has invalid cloudlet properties: %(reason)s"


class WrongBase(CloudletImageUnacceptable):
    msg_fmt = "Cloudlet image %(image_id)s needs another base VM: %(reason)s"


class DigestMismatch(CloudletImageUnacceptable):
    msg_fmt = "Cloudlet image %(image_id)s failed verification (digest mismatch): %(reason)s"


class MissingMemoryImage(CloudletImageUnacceptable):
    msg_fmt = "Cloudlet image %(image_id)s has no usable base memory image: %(reason)s"


class BaseAccessDenied(CloudletImageUnacceptable):
    """The booting project cannot read the base's images, or Glance cannot vouch for their
    contents: nothing of the base is resumed (docs/nova.md, Project isolation)."""

    # short: Nova keeps 255 characters of a fault message (%(base)s is an id prefix)
    msg_fmt = "Cloudlet image %(image_id)s may not resume base %(base)s: %(reason)s"


class FlavorMemoryMismatch(CloudletImageUnacceptable):
    msg_fmt = (
        "Cloudlet image %(image_id)s needs a flavor with %(snapshot_mb)s MB of RAM (the memory "
        "snapshot's size), not %(flavor_mb)s MB: pick a flavor with exactly that RAM"
    )


class RestoreRefused(CloudletImageUnacceptable):
    # short: Nova keeps 255 characters of a fault message, and libvirt's reason must fit
    msg_fmt = (
        "Base VM %(base)s: the saved hardware does not match this server's domain: %(reason)s"
    )
