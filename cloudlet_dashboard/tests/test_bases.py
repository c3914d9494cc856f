"""The Base VMs panel. The SDK is faked at the API wrapper (cloudlet_dashboard.api.cloudlet),
Nova and Neutron at Horizon's own api wrappers; everything else is the real plugin in Horizon."""

from __future__ import annotations

from unittest import mock

from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from novaclient import exceptions as nova_exceptions

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.test import helpers

INDEX_URL = reverse("horizon:project:cloudlet_bases:index")
IMPORT_URL = reverse("horizon:project:cloudlet_bases:import")
CREATE_URL = reverse("horizon:project:cloudlet_bases:create")


class BasesIndexTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tasks: dict[str, list] = {}
        self.patch_api(
            "task_list", side_effect=lambda request, kind=None, state=None: self.tasks.get(kind, [])
        )

    def test_index_lists_bases_and_running_imports(self) -> None:
        web = helpers.base(name="web")
        self.tasks["import-base"] = [helpers.task(name="db", stage="verify", progress=0.42)]
        self.patch_api("base_list", return_value=[web])
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertTemplateUsed(res, "horizon/common/_data_table_view.html")
        self.assertEqual([r.name for r in res.context["table"].data], ["db", "web"])
        self.assertContains(res, 'id="bases"')
        self.assertContains(res, "verify (42%)")
        self.assertContains(res, "2.0\xa0GB")
        self.assertContains(res, "512 MB")
        self.assertContains(res, f'id="bases__row__{web.id}"')
        self.assertContains(res, 'id="bases__action_import"')
        self.assertContains(res, f'id="bases__row_{web.id}__action_launch"')

    def test_failed_import_shows_the_services_message(self) -> None:
        self.tasks["import-base"] = [
            helpers.task(name="bad", state="failed", error="member disk.raw: sha256 mismatch")
        ]
        self.patch_api("base_list", return_value=[])
        res = self.client.get(INDEX_URL)
        self.assertContains(res, "Failed: member disk.raw: sha256 mismatch")

    def test_old_failed_tasks_are_not_listed(self) -> None:
        self.tasks["create-base"] = [
            helpers.task(
                kind="create-base",
                name="old",
                state="failed",
                error="x",
                created_at="2020-01-01T00:00:00Z",
            ),
            helpers.task(kind="create-base", name="done", state="succeeded"),
        ]
        self.patch_api("base_list", return_value=[])
        res = self.client.get(INDEX_URL)
        self.assertEqual(list(res.context["table"].data), [])

    def test_service_refusal_shows_its_message(self) -> None:
        self.patch_api("base_list", side_effect=cloudlet.CloudletError("policy does not allow it"))
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertMessageCount(res, error=1)
        self.assertContains(res, "Unable to retrieve base VMs: policy does not allow it")

    def test_row_update_turns_a_finished_import_into_its_base(self) -> None:
        web = helpers.base(name="web")
        running = helpers.task(name="web")
        done = helpers.task(name="web", state="succeeded", images={"disk": web.id})
        self.patch_api("task_get", side_effect=[running, done])
        self.patch_api("base_get", return_value=web)
        url = f"{INDEX_URL}?action=row_update&table=bases&obj_id=task-{running.id}"
        res = self.client.get(url, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
        self.assertContains(res, f'id="bases__row__task-{running.id}"')
        self.assertContains(res, "verify (42%)")
        res = self.client.get(url, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
        self.assertContains(res, f'id="bases__row__{web.id}"')
        self.assertContains(res, "Active")


class BaseDeleteTests(helpers.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.web = helpers.base(name="web")
        self.patch_api("base_list", return_value=[self.web])
        self.patch_api("task_list", return_value=[])

    def test_delete(self) -> None:
        delete = self.patch_api("base_delete")
        res = self.client.post(INDEX_URL, {"action": f"bases__delete__{self.web.id}"})
        self.assertRedirectsNoFollow(res, INDEX_URL)
        delete.assert_called_once_with(mock.ANY, self.web.id)

    def test_delete_refused_while_overlays_depend_on_it(self) -> None:
        self.patch_api(
            "base_delete",
            side_effect=cloudlet.CloudletError(
                "base web is still used by overlays of your project: app, app-v2", 409
            ),
        )
        res = self.client.post(INDEX_URL, {"action": f"bases__delete__{self.web.id}"}, follow=True)
        messages = [str(m) for m in res.context["messages"]]
        self.assertEqual(
            messages,
            [
                "Unable to delete base VM web: base web is still used by overlays of your project: "
                "app, app-v2"
            ],
        )


class BaseDetailAndExportTests(helpers.TestCase):
    def test_detail(self) -> None:
        web = helpers.base(name="web")
        self.patch_api("base_get", return_value=web)
        res = self.client.get(reverse("horizon:project:cloudlet_bases:detail", args=[web.id]))
        self.assertEqual(res.status_code, 200)
        self.assertTemplateUsed(res, "cloudlet/bases/_detail_overview.html")
        self.assertContains(res, helpers.BASE_ID)
        self.assertContains(res, web.memory_image_id)

    def test_detail_of_an_invisible_base_goes_back_with_the_message(self) -> None:
        self.patch_api("base_get", side_effect=cloudlet.CloudletError("base x: not found", 404))
        res = self.client.get(reverse("horizon:project:cloudlet_bases:detail", args=["x"]))
        self.assertRedirectsNoFollow(res, INDEX_URL)

    def test_export_streams_the_package(self) -> None:
        web = helpers.base(name="web 1")
        self.patch_api("base_get", return_value=web)
        self.patch_api(
            "base_package",
            return_value=cloudlet.Download(7, iter([b"pac", b"kage"])),
        )
        res = self.client.get(reverse("horizon:project:cloudlet_bases:export", args=[web.id]))
        self.assertEqual(res["Content-Disposition"], 'attachment; filename="web_1.cbase"')
        self.assertEqual(res["Content-Length"], "7")
        self.assertEqual(b"".join(res.streaming_content), b"package")


class ImportFormTests(helpers.TestCase):
    def test_form_renders_with_the_upload_progress_marker(self) -> None:
        res = self.client.get(IMPORT_URL)
        self.assertTemplateUsed(res, "cloudlet/_form.html")
        self.assertContains(res, 'enctype="multipart/form-data"')
        self.assertContains(res, "data-cloudlet-upload=")
        self.assertContains(res, 'name="package"')

    def test_upload(self) -> None:
        sent = []

        def upload(request, package, size, name, public):
            sent.append((package.read(), size, name, public))
            return helpers.task(name="web")

        self.patch_api("base_import_upload", side_effect=upload)
        package = SimpleUploadedFile("web.cbase", b"PACKAGE" * 100)
        res = self.client.post(IMPORT_URL, {"package": package, "name": "web"})
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, INDEX_URL)
        self.assertEqual(sent, [(b"PACKAGE" * 100, 700, "web", False)])

    def test_url(self) -> None:
        by_url = self.patch_api("base_import_url", return_value=helpers.task(name=None))
        self.patch_api("base_list", return_value=[])
        self.patch_api("task_list", return_value=[])
        res = self.client.post(
            IMPORT_URL, {"url": "https://bases.example.com/web.cbase"}, follow=True
        )
        self.assertEqual(res.redirect_chain, [(INDEX_URL, 302)])
        self.assertEqual(
            [str(m) for m in res.context["messages"]],
            ['Importing "https://bases.example.com/web.cbase": the table shows its progress.'],
        )
        by_url.assert_called_once_with(mock.ANY, "https://bases.example.com/web.cbase", None, False)

    def test_neither_or_both_is_refused(self) -> None:
        by_url = self.patch_api("base_import_url")
        res = self.client.post(IMPORT_URL, {"name": "web"})
        self.assertFormErrors(res, 1, "Give either a package file or a package URL.")
        package = SimpleUploadedFile("web.cbase", b"P")
        res = self.client.post(
            IMPORT_URL, {"package": package, "url": "https://bases.example.com/web.cbase"}
        )
        self.assertFormErrors(res, 1, "Give either a package file or a package URL.")
        by_url.assert_not_called()

    def test_refusal_keeps_the_form_with_the_services_message(self) -> None:
        self.patch_api(
            "base_import_url",
            side_effect=cloudlet.CloudletError("URL host bases.example.com is not allowed", 400),
        )
        res = self.client.post(IMPORT_URL, {"url": "https://bases.example.com/web.cbase"})
        self.assertEqual(res.status_code, 200)
        self.assertContains(
            res, "The service refused the package: URL host bases.example.com is not allowed"
        )


class CreateAndLaunchFormTests(helpers.TestCase):
    def test_create_from_an_instance(self) -> None:
        server = self.servers.first()
        server.status = "ACTIVE"
        self.mock_server_list = mock.patch(
            "openstack_dashboard.api.nova.server_list", return_value=([server], False)
        ).start()
        create = self.patch_api("base_create", return_value=helpers.task(kind="create-base"))
        res = self.client.get(f"{CREATE_URL}?instance_id={server.id}")
        self.assertEqual(res.context["form"].initial["instance"], server.id)
        res = self.client.post(CREATE_URL, {"instance": server.id, "name": "web"})
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, INDEX_URL)
        create.assert_called_once_with(mock.ANY, server.id, "web", False)

    def test_create_needs_a_name_and_an_active_instance(self) -> None:
        mock.patch("openstack_dashboard.api.nova.server_list", return_value=([], False)).start()
        create = self.patch_api("base_create")
        res = self.client.post(CREATE_URL, {"instance": "nope", "name": ""})
        self.assertFormErrors(res, 2)
        create.assert_not_called()

    def launch_mocks(self) -> tuple[helpers.Base, mock.MagicMock]:
        web = helpers.base(min_ram=600)
        self.patch_api("base_get", return_value=web)
        mock.patch(
            "openstack_dashboard.api.nova.flavor_list", return_value=self.flavors.list()
        ).start()
        mock.patch(
            "openstack_dashboard.api.neutron.network_list_for_tenant",
            return_value=self.networks.list(),
        ).start()
        server = self.servers.first()
        create = mock.patch(
            "openstack_dashboard.api.nova.server_create", return_value=server
        ).start()
        return web, create

    def test_launch_preselects_the_smallest_flavor_with_the_base_memory(self) -> None:
        web, _ = self.launch_mocks()
        res = self.client.get(reverse("horizon:project:cloudlet_bases:launch", args=[web.id]))
        fitting = sorted(
            (f for f in self.flavors.list() if f.ram >= 600), key=lambda f: (f.ram, f.vcpus, f.name)
        )
        self.assertEqual(res.context["form"].initial["flavor"], fitting[0].id)

    def test_launch_boots_the_base_image(self) -> None:
        web, create = self.launch_mocks()
        flavor, network = self.flavors.first(), self.networks.first()
        url = reverse("horizon:project:cloudlet_bases:launch", args=[web.id])
        res = self.client.post(url, {"name": "vm", "flavor": flavor.id, "network": network.id})
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, reverse("horizon:project:instances:index"))
        create.assert_called_once_with(
            mock.ANY,
            "vm",
            web.id,
            flavor.id,
            key_name=None,
            user_data=None,
            security_groups=None,
            nics=[{"net-id": network.id}],
        )
        self.client.post(url, {"name": "vm", "flavor": flavor.id, "network": "auto"})
        self.assertEqual(create.call_args.kwargs["nics"], [{"net-id": "__auto_allocate__"}])

    def test_launch_without_a_network(self) -> None:
        web, create = self.launch_mocks()
        flavor = self.flavors.first()
        novaclient = mock.patch("openstack_dashboard.api._nova.novaclient").start()
        mock.patch("openstack_dashboard.api.nova.get_microversion", return_value="2.67").start()
        novaclient.return_value.servers.create.return_value = self.servers.first()
        url = reverse("horizon:project:cloudlet_bases:launch", args=[web.id])
        res = self.client.post(url, {"name": "vm", "flavor": flavor.id, "network": "none"})
        self.assertNoFormErrors(res)
        novaclient.assert_called_once_with(mock.ANY, version="2.67")
        novaclient.return_value.servers.create.assert_called_once_with(
            "vm", web.id, flavor.id, nics="none"
        )
        create.assert_not_called()

    def test_nova_refusal_keeps_the_form_with_novas_message(self) -> None:
        web, create = self.launch_mocks()
        create.side_effect = nova_exceptions.Forbidden(403, "Quota exceeded for instances")
        url = reverse("horizon:project:cloudlet_bases:launch", args=[web.id])
        res = self.client.post(
            url, {"name": "vm", "flavor": self.flavors.first().id, "network": "auto"}
        )
        self.assertContains(res, "Nova refused to launch the instance: Quota exceeded")

    def test_launch_needs_a_known_flavor(self) -> None:
        web, create = self.launch_mocks()
        url = reverse("horizon:project:cloudlet_bases:launch", args=[web.id])
        res = self.client.post(url, {"name": "vm", "flavor": "nope", "network": "auto"})
        self.assertFormErrors(res, 1)
        create.assert_not_called()
