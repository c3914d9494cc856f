import horizon
from django.utils.translation import gettext_lazy as _


class Bases(horizon.Panel):
    name = _("Base VMs")
    slug = "cloudlet_bases"
    permissions = ("openstack.services.cloudlet",)
    policy_rules = (("cloudlet", "cloudlet:base:list"),)
