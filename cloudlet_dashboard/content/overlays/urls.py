from django.urls import re_path

from cloudlet_dashboard.content.overlays import views

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(r"^create/$", views.CreateView.as_view(), name="create"),
    re_path(r"^(?P<overlay_id>[^/]+)/$", views.DetailView.as_view(), name="detail"),
    re_path(
        r"^(?P<overlay_id>[^/]+)/synthesize/$", views.SynthesizeView.as_view(), name="synthesize"
    ),
    re_path(r"^(?P<overlay_id>[^/]+)/download/$", views.download, name="download"),
]
