"""The API's resources as openstacksdk resources (docs/api-ref.md has the fields)."""

from __future__ import annotations

from openstack import resource


class Base(resource.Resource):
    resource_key = "base"
    resources_key = "bases"
    base_path = "/bases"
    allow_list = allow_fetch = allow_delete = True
    _query_mapping = resource.QueryParameters("base_id")

    name = resource.Body("name")
    base_id = resource.Body("base_id")
    memory_image_id = resource.Body("memory_image_id")
    status = resource.Body("status")
    visibility = resource.Body("visibility")
    project_id = resource.Body("project_id")
    size = resource.Body("size", type=int)
    min_ram = resource.Body("min_ram", type=int)
    created_at = resource.Body("created_at")
    updated_at = resource.Body("updated_at")


class Overlay(resource.Resource):
    resource_key = "overlay"
    resources_key = "overlays"
    base_path = "/overlays"
    allow_list = allow_fetch = allow_delete = True
    _query_mapping = resource.QueryParameters("base_id")

    name = resource.Body("name")
    base_id = resource.Body("base_id")
    base_disk_image_id = resource.Body("base_disk_image_id")
    status = resource.Body("status")
    visibility = resource.Body("visibility")
    project_id = resource.Body("project_id")
    size = resource.Body("size", type=int)
    checksum = resource.Body("checksum")
    created_at = resource.Body("created_at")
    updated_at = resource.Body("updated_at")


class Task(resource.Resource):
    resource_key = "task"
    resources_key = "tasks"
    base_path = "/tasks"
    allow_list = allow_fetch = True
    _query_mapping = resource.QueryParameters("kind", "state")

    kind = resource.Body("kind")
    name = resource.Body("name")
    state = resource.Body("state")
    stage = resource.Body("stage")
    progress = resource.Body("progress", type=float)
    host = resource.Body("host")
    server_id = resource.Body("server_id")
    base_id = resource.Body("base_id")
    images = resource.Body("images", type=dict)
    stats = resource.Body("stats", type=dict)
    error = resource.Body("error")
    project_id = resource.Body("project_id")
    user_id = resource.Body("user_id")
    created_at = resource.Body("created_at")
    updated_at = resource.Body("updated_at")


class Synthesis(resource.Resource):
    resource_key = "synthesis"
    resources_key = "syntheses"
    base_path = "/syntheses"
    allow_list = allow_fetch = True

    name = resource.Body("name")
    overlay_id = resource.Body("overlay_id")
    task_id = resource.Body("task_id")
    state = resource.Body("state")
    stage = resource.Body("stage")
    progress = resource.Body("progress", type=float)
    error = resource.Body("error")
    server = resource.Body("server", type=dict)
    # the compute host's per-stage record of the spawn: state, error, started_at, stages (name,
    # start, end, seconds, bytes, failed; in start order), counters; None when it has none
    statistics = resource.Body("statistics", type=dict)
    created_at = resource.Body("created_at")
    updated_at = resource.Body("updated_at")
