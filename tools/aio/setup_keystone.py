"""Keystone of the all-in-one: service project, users and endpoints; two user projects, `demo`
and `alt_demo`, each with a user of the same name and role member (idempotent)."""

import openstack

c = openstack.connect(auth_url="http://127.0.0.1:5000/v3", username="admin", password="adminpass",
                      project_name="admin", user_domain_name="Default",
                      project_domain_name="Default", region_name="RegionOne")
project = c.identity.find_project("service") or c.identity.create_project(name="service",
                                                                           domain_id="default")
roles = {r.name: r for r in c.identity.roles()}
for name in ("member", "service"):
    if name not in roles:
        roles[name] = c.identity.create_role(name=name)
for u in ("nova", "glance", "placement", "neutron", "cloudlet"):
    user = c.identity.find_user(u) or c.identity.create_user(name=u, password=u + "pass",
                                                              domain_id="default")
    for r in ("admin", "service"):
        c.identity.assign_project_role_to_user(project, user, roles[r])
for name in ("demo", "alt_demo"):  # tools/aio/memberrc; e2e.sh's projects A and B
    p = c.identity.find_project(name) or c.identity.create_project(name=name, domain_id="default")
    user = c.identity.find_user(name) or c.identity.create_user(name=name, password=name + "pass",
                                                                 domain_id="default")
    c.identity.assign_project_role_to_user(p, user, roles["member"])
for name, kind, url in (("placement", "placement", "http://127.0.0.1:8778"),
                        ("glance", "image", "http://127.0.0.1:9292"),
                        ("nova", "compute", "http://127.0.0.1:8774/v2.1"),
                        ("neutron", "network", "http://127.0.0.1:9696"),
                        ("cloudlet", "cloudlet", "http://127.0.0.1:8790")):
    if c.identity.find_service(name) is None:
        s = c.identity.create_service(name=name, type=kind)
        for iface in ("public", "internal", "admin"):
            c.identity.create_endpoint(service_id=s.id, interface=iface, url=url,
                                       region_id="RegionOne")
print("aio: keystone catalog ready")
