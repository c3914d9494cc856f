"""The Base VMs panel with the SDK faked at the API wrapper (cloudlet_dashboard.api.cloudlet)."""

from __future__ import annotations

from django.urls import reverse

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.test import helpers

INDEX_URL = reverse("horizon:project:cloudlet_bases:index")


class BasesIndexTests(helpers.TestCase):
    def test_index_lists_bases_and_running_imports(self) -> None:
        web = helpers.base(name="web")
        importing = helpers.task(name="db", stage="verify", progress=0.42)
        self.patch_api("base_list", return_value=[web])
        self.patch_api(
            "task_list",
            side_effect=lambda req, kind, state=None: [importing] if kind == "import-base" else [],
        )
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertTemplateUsed(res, "horizon/common/_data_table_view.html")
        table = res.context["table"]
        self.assertEqual([r.name for r in table.data], ["db", "web"])
        self.assertContains(res, 'id="bases"')
        self.assertContains(res, "verify (42%)")
        self.assertContains(res, "2.0\xa0GB")
        self.assertContains(res, "512 MB")
        self.assertContains(res, f'id="bases__row__{web.id}"')

    def test_failed_import_shows_the_services_message(self) -> None:
        failed = helpers.task(name="bad", state="failed", error="member disk.raw: sha256 mismatch")
        self.patch_api("base_list", return_value=[])
        self.patch_api(
            "task_list",
            side_effect=lambda req, kind, state=None: [failed] if kind == "import-base" else [],
        )
        res = self.client.get(INDEX_URL)
        self.assertContains(res, "Failed: member disk.raw: sha256 mismatch")

    def test_service_refusal_shows_its_message(self) -> None:
        self.patch_api(
            "task_list", side_effect=cloudlet.CloudletError("policy does not allow it", 403)
        )
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertMessageCount(res, error=1)
        self.assertContains(res, "Unable to retrieve base VMs: policy does not allow it")
