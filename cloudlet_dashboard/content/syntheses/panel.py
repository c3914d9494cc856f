import horizon
from django.utils.translation import gettext_lazy as _


class Syntheses(horizon.Panel):
    name = _("Syntheses")
    slug = "cloudlet_syntheses"
    permissions = ("openstack.services.cloudlet",)
    policy_rules = (("cloudlet", "cloudlet:synthesis:list"),)
