from cloudlet_api.schemas import NAME, UUID, query_schema

CREATE = {
    "type": "object",
    "properties": {
        "server_id": UUID,
        "name": NAME,
        "after": {"type": "string", "enum": ["resume", "delete"]},
        "codec": {"type": "string", "enum": ["zstd", "xz"]},
        "public": {"type": "boolean"},
    },
    "required": ["server_id", "name"],
    "additionalProperties": False,
}

LIST_QUERY = query_schema({"base_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"}})
