import horizon
from django.utils.translation import gettext_lazy as _


class Overlays(horizon.Panel):
    name = _("Overlays")
    slug = "cloudlet_overlays"
    permissions = ("openstack.services.cloudlet",)
    policy_rules = (("cloudlet", "cloudlet:overlay:list"),)
