from cloudlet_api.schemas import NAME, UUID, query_schema

CREATE = {
    "type": "object",
    "properties": {
        "overlay_id": UUID,
        "name": NAME,
        "flavor_id": {"type": "string", "minLength": 1, "maxLength": 255},
        "network_id": UUID,
        # Nova's two special values (a server with no network, or one Nova allocates)
        "network": {"enum": ["auto", "none"]},
    },
    "required": ["overlay_id", "name", "flavor_id"],
    "not": {"required": ["network_id", "network"]},
    "additionalProperties": False,
}

LIST_QUERY = query_schema({})
