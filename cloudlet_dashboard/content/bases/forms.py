from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import forms, messages
from novaclient import exceptions as nova_exceptions

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import instances

NAME_MAX = 255


class ImportBaseForm(forms.SelfHandlingForm):
    package = forms.FileField(
        label=_("Package file (.cbase)"),
        required=False,
        help_text=_("A base VM package exported by cloudlet, uploaded from this browser."),
    )
    url = forms.URLField(
        label=_("or Package URL"),
        required=False,
        assume_scheme="https",
        help_text=_("An http(s) URL the service fetches (it only accepts allowed sites)."),
    )
    name = forms.CharField(
        label=_("Name"),
        max_length=NAME_MAX,
        required=False,
        help_text=_("Default: the name inside the package."),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if bool(data.get("package")) == bool(data.get("url")):
            raise forms.ValidationError(_("Give either a package file or a package URL."))
        return data

    def handle(self, request: Any, data: dict[str, Any]) -> bool:
        name = data.get("name") or None
        package = data.get("package")
        try:
            if package:
                package.seek(0)
                task = cloudlet.base_import_upload(request, package, package.size, name, False)
            else:
                task = cloudlet.base_import_url(request, data["url"], name, False)
        except cloudlet.CloudletError as e:
            self.api_error(_("The service refused the package: %s") % e)
            return False
        what = task.name or name or (package.name if package else data["url"])
        messages.success(request, _('Importing "%s": the table shows its progress.') % what)
        return True


class CreateBaseForm(forms.SelfHandlingForm):
    instance = forms.ThemableChoiceField(label=_("Instance"))
    name = forms.CharField(label=_("Base VM name"), max_length=NAME_MAX)

    def __init__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["instance"].choices = instances.active_server_choices(request)

    def handle(self, request: Any, data: dict[str, Any]) -> bool:
        try:
            cloudlet.base_create(request, data["instance"], data["name"], False)
        except cloudlet.CloudletError as e:
            self.api_error(_("The service refused to create the base VM: %s") % e)
            return False
        messages.success(
            request,
            _('Saving the instance as base VM "%s": the table shows its progress.') % data["name"],
        )
        return True


class LaunchForm(forms.SelfHandlingForm):
    name = forms.CharField(label=_("Instance name"), max_length=NAME_MAX)
    flavor = forms.ThemableChoiceField(
        label=_("Flavor"),
        help_text=_("Preselected: the smallest flavor with the base's memory."),
    )
    network = forms.ThemableChoiceField(label=_("Network"))

    def __init__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["flavor"].choices = instances.flavor_choices(request)
        self.fields["network"].choices = instances.network_choices(request)

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        try:
            server = instances.launch(
                request, data["name"], self.initial["base_id"], data["flavor"], data["network"]
            )
        except nova_exceptions.ClientException as e:
            self.api_error(_("Nova refused to launch the instance: %s") % e)
            return False
        messages.success(request, _('Launching "%s" from the base VM.') % data["name"])
        return server
