"""Scheduler weigher: prefer hosts that already cache the base VM of the image being booted.

Enable with `[filter_scheduler] weight_classes = nova.scheduler.weights.all_weighers,
cloudlet_nova.weigher.CloudletBaseWeigher`. A host caching the base reports the trait
CUSTOM_CLOUDLET_BASE_<id> (see CloudletDriver.update_provider_tree); it weighs 1, others 0, times
[cloudlet] base_weight_multiplier. Plain images weigh 0 everywhere.
"""

from __future__ import annotations

from typing import Any

from nova import context as nova_context
from nova import exception
from nova.scheduler import weights
from nova.scheduler.client import report
from oslo_config import cfg
from oslo_log import log as logging

from cloudlet_nova import conf as cloudlet_conf  # noqa: F401  (registers [cloudlet])
from cloudlet_nova.cache import base_trait
from cloudlet_nova.glance import GlanceImages

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
_MAX_IMAGES = 256  # image id -> trait answers kept (an image's base never changes)


class CloudletBaseWeigher(weights.BaseHostWeigher):
    def __init__(self) -> None:
        super().__init__()
        self._image_traits: dict[str, str | None] = {}

    def weight_multiplier(self, host_state: Any) -> float:
        return CONF.cloudlet.base_weight_multiplier

    def _weigh_object(self, host_state: Any, request_spec: Any) -> float:
        context = getattr(request_spec, "_context", None) or nova_context.get_admin_context()
        trait = self._trait_for(context, request_spec)
        if trait is None:
            return 0.0
        traits = report.report_client_singleton().get_provider_traits(context, host_state.uuid)
        return 1.0 if trait in traits.traits else 0.0

    def _trait_for(self, context: Any, request_spec: Any) -> str | None:
        image = request_spec.image if request_spec.obj_attr_is_set("image") else None
        image_id = image.id if image is not None and image.obj_attr_is_set("id") else None
        if not image_id:
            return None  # boot from volume
        if image_id not in self._image_traits:
            try:
                described = GlanceImages(context).describe(image_id)
            except exception.NovaException as e:  # no opinion: the build reports the problem
                LOG.debug("cloudlet weigher: image %s: %s", image_id, e)
                return None
            if len(self._image_traits) >= _MAX_IMAGES:
                self._image_traits.clear()
            self._image_traits[image_id] = base_trait(described.base_id) if described else None
        return self._image_traits[image_id]
