from django.urls import re_path

from cloudlet_dashboard.content.bases import views

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(r"^import/$", views.ImportView.as_view(), name="import"),
    re_path(r"^create/$", views.CreateView.as_view(), name="create"),
    re_path(r"^(?P<base_id>[^/]+)/$", views.DetailView.as_view(), name="detail"),
    re_path(r"^(?P<base_id>[^/]+)/launch/$", views.LaunchView.as_view(), name="launch"),
    re_path(r"^(?P<base_id>[^/]+)/export/$", views.export_package, name="export"),
]
