from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import forms, messages

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import instances

NAME_MAX = 255
AFTER_CHOICES = (
    ("resume", _("Keep the instance running")),
    ("delete", _("Delete the instance")),
)


class CreateOverlayForm(forms.SelfHandlingForm):
    instance = forms.ThemableChoiceField(
        label=_("Instance"), help_text=_("A running instance launched from a base VM.")
    )
    name = forms.CharField(label=_("Overlay name"), max_length=NAME_MAX)
    after = forms.ThemableChoiceField(
        label=_("After the capture"), choices=AFTER_CHOICES, initial="resume"
    )

    def __init__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["instance"].choices = instances.active_server_choices(request)

    def handle(self, request: Any, data: dict[str, Any]) -> bool:
        try:
            cloudlet.overlay_create(request, data["instance"], data["name"], data["after"], False)
        except cloudlet.CloudletError as e:
            self.api_error(_("The service refused to capture the overlay: %s") % e)
            return False
        messages.success(
            request, _('Capturing overlay "%s": the table shows its progress.') % data["name"]
        )
        return True


class SynthesizeForm(forms.SelfHandlingForm):
    name = forms.CharField(label=_("Instance name"), max_length=NAME_MAX)
    flavor = forms.ThemableChoiceField(label=_("Flavor"))
    network = forms.ThemableChoiceField(label=_("Network"))

    def __init__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["flavor"].choices = instances.flavor_choices(request)
        self.fields["network"].choices = instances.network_choices(request)

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        try:
            synthesis = cloudlet.synthesize(
                request,
                self.initial["overlay_id"],
                data["name"],
                data["flavor"],
                data["network"],
            )
        except cloudlet.CloudletError as e:
            self.api_error(_("The service refused the synthesis: %s") % e)
            return False
        messages.success(request, _('Synthesizing "%s".') % data["name"])
        return synthesis
