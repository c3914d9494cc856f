from cloudlet_api.schemas import NAME, UUID, query_schema

CREATE = {
    "type": "object",
    "properties": {
        "server_id": UUID,
        "name": NAME,
        "public": {"type": "boolean"},
    },
    "required": ["server_id", "name"],
    "additionalProperties": False,
}

# JSON body of POST /bases/import (a URL import); an upload sends the package itself instead.
IMPORT_URL = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "minLength": 1, "maxLength": 4096},
        "name": NAME,
        "public": {"type": "boolean"},
    },
    "required": ["url"],
    "additionalProperties": False,
}

# Query string of an upload (POST /bases/import, Content-Type application/octet-stream).
IMPORT_UPLOAD_QUERY = query_schema(
    {
        "name": NAME,
        "public": {"type": "string", "enum": ["true", "false"]},
    }
)

LIST_QUERY = query_schema({"base_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"}})

IMPORT_URL_QUERY = query_schema({})
