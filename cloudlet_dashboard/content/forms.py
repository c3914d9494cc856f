"""A modal form view as the panels use it: one pair of templates, help text from the view."""

from __future__ import annotations

from typing import Any

from horizon import forms


class CloudletFormView(forms.ModalFormView):
    template_name = "cloudlet/form.html"
    help_paragraphs: tuple[str, ...] = ()
    upload = False  # a file input: multipart, with the upload progress bar

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["help_paragraphs"] = self.help_paragraphs
        context["upload"] = self.upload
        return context
