from django.urls import re_path

from cloudlet_dashboard.content.syntheses import views

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(r"^(?P<synthesis_id>[^/]+)/$", views.DetailView.as_view(), name="detail"),
]
