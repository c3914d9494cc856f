from cloudlet_api.schemas import query_schema

KINDS = ["import-base", "create-base", "capture-overlay", "synthesize"]
STATES = ["running", "succeeded", "failed"]

LIST_QUERY = query_schema(
    {
        "kind": {"type": "string", "enum": KINDS},
        "state": {"type": "string", "enum": STATES},
    }
)
