"""Policy-driven hiding with Horizon's own policy engine and the defaults generated from
cloudlet_api's rules, and the Instances panel's cloudlet row actions. The SDK is faked at the
API wrapper (cloudlet_dashboard.api.cloudlet), Glance at Horizon's api.glance."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from unittest import mock

import yaml
from django.conf import settings
from django.core.management import call_command
from django.test.utils import override_settings
from django.urls import reverse
from openstack_auth import policy as horizon_policy
from openstack_dashboard.api import glance
from openstack_dashboard.dashboards.project.instances import tables as instance_tables

from cloudlet_dashboard import overrides
from cloudlet_dashboard import policy as cloudlet_policy
from cloudlet_dashboard.test import helpers

BASES_URL = reverse("horizon:project:cloudlet_bases:index")
OVERLAYS_URL = reverse("horizon:project:cloudlet_overlays:index")

MEMBER = [{"id": "2", "name": "member"}, {"id": "3", "name": "reader"}]
READER = [{"id": "3", "name": "reader"}]
MANAGER = [{"id": "1", "name": "manager"}] + MEMBER


class ShippedDefaultsTests(helpers.TestCase):
    def test_defaults_are_what_horizon_dumps_from_cloudlet_api(self) -> None:
        """conf/default_policies/cloudlet.yaml is regenerated with: python -m django
        dump_default_policies --namespace cloudlet_api --output-file <it>
        --settings=cloudlet_dashboard.test.settings"""
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            call_command("dump_default_policies", namespace="cloudlet_api")
        self.assertEqual(
            yaml.safe_load(cloudlet_policy.DEFAULTS.read_text()), yaml.safe_load(out.getvalue())
        )


@override_settings(POLICY_CHECK_FUNCTION="openstack_auth.policy.check")
class PolicyTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        horizon_policy.reset()
        self.addCleanup(horizon_policy.reset)
        self.base = helpers.base(name="web")
        self.patch_api("base_list", return_value=[self.base])
        self.patch_api("task_list", return_value=[])

    def as_user(self, roles: list[dict[str, str]]) -> None:
        self._setup_user(roles=roles)

    def test_a_member_may_import_but_not_delete(self) -> None:
        self.as_user(MEMBER)
        res = self.client.get(BASES_URL)
        self.assertContains(res, 'id="bases__action_import"')
        self.assertContains(res, f'id="bases__row_{self.base.id}__action_export"')
        self.assertNotContains(res, "bases__action_delete")
        self.assertNotContains(res, f"bases__row_{self.base.id}__action_delete")

    def test_a_manager_may_delete(self) -> None:
        self.as_user(MANAGER)
        res = self.client.get(BASES_URL)
        self.assertContains(res, f'id="bases__row_{self.base.id}__action_delete"')

    def test_a_reader_sees_the_list_and_no_action_that_changes_it(self) -> None:
        self.as_user(READER)
        res = self.client.get(BASES_URL)
        self.assertContains(res, 'id="bases"')
        self.assertNotContains(res, "bases__action_import")
        self.assertNotContains(res, "bases__action_create")
        self.assertContains(res, f'id="bases__row_{self.base.id}__action_export"')
        app = helpers.overlay(name="app")
        self.patch_api("overlay_list", return_value=[app])
        self.patch_api("overlay_summary", return_value=None)
        res = self.client.get(OVERLAYS_URL)
        self.assertContains(res, f'id="overlays__row_{app.id}__action_download"')
        self.assertNotContains(res, "__action_synthesize")

    def test_without_a_role_the_panels_are_not_offered(self) -> None:
        self.as_user([])
        res = self.client.get(BASES_URL)
        self.assertNotEqual(res.status_code, 200)


class InstanceActionsTests(helpers.TestCase):
    def image(self, **properties: str) -> glance.Image:
        return glance.Image({"id": "img-1", "name": "web", **properties})

    def server(self, image: object, status: str = "ACTIVE") -> object:
        server = self.servers.first()
        server.status = status
        server.image = image
        return server

    def test_the_instances_table_has_the_actions(self) -> None:
        self.assertEqual(
            settings.HORIZON_CONFIG["customization_module"], "cloudlet_dashboard.overrides"
        )
        self.patch_api("base_list", return_value=[])
        self.patch_api("task_list", return_value=[])
        self.client.get(BASES_URL)  # Horizon loads its customization module with its URLs
        names = [a.name for a in instance_tables.InstancesTable._meta.row_actions]
        self.assertIn("create_overlay", names)
        self.assertIn("create_base", names)
        self.assertEqual(len(names), len(set(names)))
        overrides.add_instance_actions(instance_tables.InstancesTable)  # once only
        self.assertEqual(len(instance_tables.InstancesTable._meta.row_actions), len(names))

    def test_offered_for_servers_booted_from_cloudlet_images(self) -> None:
        action = overrides.CreateOverlay()
        for cloudlet_type in ("base-disk", "overlay"):
            server = self.server(self.image(cloudlet_type=cloudlet_type))
            self.assertTrue(action.allowed(self.request, server), cloudlet_type)
        self.assertFalse(action.allowed(self.request, self.server(self.image())))
        self.assertFalse(
            action.allowed(self.request, self.server(self.image(cloudlet_type="base-memory")))
        )
        self.assertFalse(
            action.allowed(
                self.request, self.server(self.image(cloudlet_type="overlay"), status="SHUTOFF")
            )
        )

    def test_a_row_updated_alone_looks_the_image_up(self) -> None:
        with mock.patch(
            "openstack_dashboard.api.glance.image_get",
            return_value=self.image(cloudlet_type="base-disk"),
        ) as image_get:
            self.assertTrue(
                overrides.CreateBaseVM().allowed(self.request, self.server({"id": "img-1"}))
            )
        image_get.assert_called_once_with(self.request, "img-1")
        with mock.patch("openstack_dashboard.api.glance.image_get", side_effect=Exception("404")):
            self.assertFalse(
                overrides.CreateBaseVM().allowed(self.request, self.server({"id": "img-1"}))
            )

    def test_the_action_opens_the_form_for_that_instance(self) -> None:
        server = self.server(self.image(cloudlet_type="overlay"))
        url = overrides.CreateOverlay().get_link_url(server)
        self.assertEqual(
            url, f"{reverse('horizon:project:cloudlet_overlays:create')}?instance_id={server.id}"
        )


class TranslationScaffoldTests(helpers.TestCase):
    def test_messages_extract_from_code_and_templates(self) -> None:
        """Horizon's extract_messages with the repository's babel configs finds the panels'
        strings, templates' included (the .pot files are not kept)."""
        root = Path(__file__).resolve().parents[2]
        pot = root / "cloudlet_dashboard" / "locale" / "django.pot"
        self.addCleanup(lambda: [p.unlink(missing_ok=True) for p in pot.parent.glob("*.pot")])
        with contextlib.chdir(root):
            call_command("extract_messages", module=["cloudlet_dashboard"], verbosity=0)
        text = pot.read_text()
        self.assertIn('msgid "Import Base VM Package"', text)  # Python
        self.assertIn('msgid "Modified chunks by kind"', text)  # a template
