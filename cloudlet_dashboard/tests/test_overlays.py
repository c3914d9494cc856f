"""The Overlays panel. The SDK is faked at the API wrapper (cloudlet_dashboard.api.cloudlet),
Nova and Neutron at Horizon's own api wrappers."""

from __future__ import annotations

from typing import Any
from unittest import mock

from django.urls import reverse

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.test import helpers

INDEX_URL = reverse("horizon:project:cloudlet_overlays:index")
CREATE_URL = reverse("horizon:project:cloudlet_overlays:create")


def summary(**fields: Any) -> dict[str, Any]:
    """What OverlayReader.summary() returns for an overlay."""
    values = {
        "version": "1.0",
        "base_id": helpers.BASE_ID,
        "images": {
            "disk": {"size": 1 << 30, "digest": "d" * 64},
            "memory": {"size": 512 << 20, "digest": "m" * 64},
        },
        "chunks": {"ZERO": 40, "BASE_MEMORY": 0, "BASE_DISK": 160, "SELF": 0, "NEW": 1200},
        "slots": 1200,
        "frames": 5,
        "codec": "zstd",
        "frame_bytes": 3 << 20,
        "blobs": {},
        "size": 4 << 20,
        "created": {"tool": "cloudlet", "version": "0.1.0", "time": "2026-12-07T11:00:00Z"},
        "meta": {},
    }
    values.update(fields)
    return values


class OverlaysIndexTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tasks: list = []
        self.patch_api("task_list", side_effect=lambda request, kind=None, state=None: self.tasks)

    def test_index_shows_what_each_overlay_holds(self) -> None:
        app = helpers.overlay(name="app")
        ordered = helpers.overlay(name="app-ordered")
        summaries = {
            app.id: summary(),
            ordered.id: summary(meta={"access_order": {"prefix_frames": 1, "accessed_slots": 9}}),
        }
        self.patch_api("overlay_list", return_value=[app, ordered])
        self.patch_api("overlay_summary", side_effect=lambda request, oid: summaries[oid])
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertContains(res, 'id="overlays"')
        self.assertContains(res, "NEW 1200, BASE_DISK 160, ZERO 40")
        self.assertContains(res, "1.0\xa0GB")
        self.assertContains(res, "512.0\xa0MB")
        access = {
            r.datum.name: r.cells["access_ordered"].data for r in res.context["table"].get_rows()
        }
        self.assertEqual(access, {"app": "No", "app-ordered": "Yes"})
        self.assertContains(res, f'id="overlays__row_{app.id}__action_synthesize"')

    def test_an_unreadable_overlay_file_says_why(self) -> None:
        app = helpers.overlay(name="app")
        self.patch_api("overlay_list", return_value=[app])
        self.patch_api(
            "overlay_summary",
            side_effect=cloudlet.CloudletError("not a cloudlet overlay (bad magic)"),
        )
        res = self.client.get(INDEX_URL)
        self.assertContains(res, "unreadable: not a cloudlet overlay (bad magic)")

    def test_a_running_capture_shows_its_stage(self) -> None:
        self.tasks = [
            helpers.task(kind="capture-overlay", name="app", stage="capture memory", progress=0.3)
        ]
        self.patch_api("overlay_list", return_value=[])
        res = self.client.get(INDEX_URL)
        self.assertContains(res, "capture memory (30%)")

    def test_delete_refused_shows_the_services_message(self) -> None:
        app = helpers.overlay(name="app")
        self.patch_api("overlay_list", return_value=[app])
        self.patch_api("overlay_summary", return_value=summary())
        self.patch_api(
            "overlay_delete",
            side_effect=cloudlet.CloudletError("policy does not allow cloudlet:overlay:delete"),
        )
        res = self.client.post(INDEX_URL, {"action": f"overlays__delete__{app.id}"}, follow=True)
        self.assertEqual(
            [str(m) for m in res.context["messages"]],
            ["Unable to delete overlay app: policy does not allow cloudlet:overlay:delete"],
        )


class OverlayDetailTests(helpers.TestCase):
    def test_detail_shows_the_manifest_and_the_chunk_chart(self) -> None:
        app = helpers.overlay(name="app")
        self.patch_api("overlay_get", return_value=app)
        self.patch_api("overlay_summary", return_value=summary())
        res = self.client.get(reverse("horizon:project:cloudlet_overlays:detail", args=[app.id]))
        self.assertEqual(res.status_code, 200)
        self.assertContains(res, 'id="overlay-manifest"')
        self.assertContains(res, "1200 new chunks in 5 frames")
        self.assertContains(res, 'class="kind-bar" data-kind="NEW" data-chunks="1200"')
        self.assertContains(res, 'data-kind="ZERO" data-chunks="40"')
        self.assertNotContains(res, 'data-kind="SELF"')
        self.assertContains(res, "1200 (85.7%)")

    def test_detail_without_a_readable_file_says_so_and_draws_nothing(self) -> None:
        app = helpers.overlay(name="app", status="queued")
        self.patch_api("overlay_get", return_value=app)
        res = self.client.get(reverse("horizon:project:cloudlet_overlays:detail", args=[app.id]))
        self.assertContains(res, 'id="overlay-manifest-missing"')
        self.assertNotContains(res, "<svg")

    def test_download_streams_the_file(self) -> None:
        app = helpers.overlay(name="app")
        self.patch_api("overlay_get", return_value=app)
        self.patch_api("overlay_file", return_value=cloudlet.Download(0, iter([b"OVL"])))
        res = self.client.get(reverse("horizon:project:cloudlet_overlays:download", args=[app.id]))
        self.assertEqual(res["Content-Disposition"], 'attachment; filename="app.overlay"')
        self.assertFalse(res.has_header("Content-Length"))
        self.assertEqual(b"".join(res.streaming_content), b"OVL")


class CreateOverlayFormTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.server = self.servers.first()
        self.server.status = "ACTIVE"
        mock.patch(
            "openstack_dashboard.api.nova.server_list", return_value=([self.server], False)
        ).start()

    def test_capture_and_delete_the_instance_after(self) -> None:
        create = self.patch_api("overlay_create", return_value=helpers.task())
        res = self.client.get(f"{CREATE_URL}?instance_id={self.server.id}")
        self.assertContains(res, 'name="after"')
        data = {"instance": self.server.id, "name": "app", "after": "delete"}
        res = self.client.post(CREATE_URL, data)
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, INDEX_URL)
        create.assert_called_once_with(mock.ANY, self.server.id, "app", "delete", False)

    def test_an_unknown_after_is_refused(self) -> None:
        create = self.patch_api("overlay_create")
        data = {"instance": self.server.id, "name": "app", "after": "shelve"}
        res = self.client.post(CREATE_URL, data)
        self.assertFormErrors(res, 1)
        create.assert_not_called()

    def test_refusal_shows_the_services_message(self) -> None:
        self.patch_api(
            "overlay_create",
            side_effect=cloudlet.CloudletError("server was not booted from a cloudlet base", 409),
        )
        data = {"instance": self.server.id, "name": "app", "after": "resume"}
        res = self.client.post(CREATE_URL, data)
        self.assertContains(
            res,
            "The service refused to capture the overlay: server was not booted from a cloudlet "
            "base",
        )


class SynthesizeFormTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.app = helpers.overlay(name="app")
        self.url = reverse("horizon:project:cloudlet_overlays:synthesize", args=[self.app.id])
        mock.patch(
            "openstack_dashboard.api.nova.flavor_list", return_value=self.flavors.list()
        ).start()
        mock.patch(
            "openstack_dashboard.api.neutron.network_list_for_tenant",
            return_value=self.networks.list(),
        ).start()

    def test_form_offers_flavors_networks_and_nova_special_networks(self) -> None:
        res = self.client.get(self.url)
        self.assertEqual(res.status_code, 200)
        networks = [v for v, _ in res.context["form"].fields["network"].choices]
        self.assertEqual(networks[-2:], ["auto", "none"])
        self.assertIn(self.networks.first().id, networks)

    def test_synthesize_opens_the_synthesis_view(self) -> None:
        made = helpers.synthesis(name="app-1")
        synthesize = self.patch_api("synthesize", return_value=made)
        flavor = self.flavors.first()
        res = self.client.post(self.url, {"name": "app-1", "flavor": flavor.id, "network": "none"})
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(
            res, reverse("horizon:project:cloudlet_syntheses:detail", args=[made.id])
        )
        synthesize.assert_called_once_with(mock.ANY, self.app.id, "app-1", flavor.id, "none")

    def test_missing_fields_are_refused(self) -> None:
        synthesize = self.patch_api("synthesize")
        res = self.client.post(self.url, {"name": "", "flavor": "", "network": ""})
        self.assertFormErrors(res, 3)
        synthesize.assert_not_called()

    def test_refusal_shows_the_services_message(self) -> None:
        self.patch_api(
            "synthesize", side_effect=cloudlet.CloudletError("Flavor f9 could not be found.", 400)
        )
        flavor = self.flavors.first()
        res = self.client.post(self.url, {"name": "a", "flavor": flavor.id, "network": "auto"})
        self.assertContains(res, "The service refused the synthesis: Flavor f9 could not be found.")
