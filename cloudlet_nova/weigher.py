"""Scheduler weigher: prefer hosts that already cache the base VM of the image being booted.

Enable with `[filter_scheduler] weight_classes = nova.scheduler.weights.all_weighers,
cloudlet_nova.weigher.CloudletBaseWeigher`. A host caching the base reports the trait
CUSTOM_CLOUDLET_BASE_<id> (see CloudletDriver.update_provider_tree); it weighs 1, others 0, times
[cloudlet] base_weight_multiplier. Plain images weigh 0 everywhere.

The base is looked up with the request's own context, once per request and never cached across
requests (visibility differs between projects and changes over time): an image whose base disk
and memory images the requesting project cannot read weighs 0 everywhere, so a host's cached
bases never attract (nor reveal anything to) another project's boot. That the images' contents
are the base is checked on the host (BaseCache.ensure); the weigher only expresses a preference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nova import exception
from nova.scheduler import weights
from nova.scheduler.client import report
from oslo_config import cfg
from oslo_log import log as logging

from cloudlet_nova import conf as cloudlet_conf  # noqa: F401  (registers [cloudlet])
from cloudlet_nova.cache import base_trait
from cloudlet_nova.glance import GlanceImages, Kind

LOG = logging.getLogger(__name__)
CONF = cfg.CONF


@dataclass(frozen=True)
class _Wanted:
    """What one request weighs hosts by: the trait of its base (None: no preference)."""

    context: Any
    trait: str | None


class CloudletBaseWeigher(weights.BaseHostWeigher):
    def weight_multiplier(self, host_state: Any) -> float:
        return CONF.cloudlet.base_weight_multiplier

    def weigh_objects(self, weighed_obj_list: list[Any], request_spec: Any) -> list[float]:
        context = getattr(request_spec, "_context", None)  # the requesting user's
        trait = base_trait_for(context, request_spec) if context is not None else None
        return super().weigh_objects(weighed_obj_list, _Wanted(context, trait))

    def _weigh_object(self, host_state: Any, wanted: _Wanted) -> float:
        if wanted.trait is None:
            return 0.0
        traits = report.report_client_singleton().get_provider_traits(
            wanted.context, host_state.uuid
        )
        return 1.0 if wanted.trait in traits.traits else 0.0


def base_trait_for(context: Any, request_spec: Any) -> str | None:
    """The trait of the base the request's image resumes, if `context` can read the image and
    its base disk and memory images (GlanceImages.base_images); None otherwise."""
    image = request_spec.image if request_spec.obj_attr_is_set("image") else None
    image_id = image.id if image is not None and image.obj_attr_is_set("id") else None
    if not image_id:
        return None  # boot from volume
    glance = GlanceImages(context)
    try:
        described = glance.describe(image_id)
        if described is None or described.kind is Kind.BASE_MEMORY:
            return None
        disk, _memory = glance.base_images(described)
    except exception.NovaException as e:  # no preference: the build reports the problem
        LOG.debug("cloudlet weigher: image %s: %s", image_id, e)
        return None
    return base_trait(disk.base_id)
