"""JSON schemas of request bodies and query strings, one module per resource, and the check
that runs before a handler sees a request: a failure is a 400 naming the field and the rule."""

from __future__ import annotations

from typing import Any

import jsonschema

from cloudlet_api import errors

UUID = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$",
}
NAME = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^\\x00-\\x1f\\x7f/]+$"}


def validate(schema: dict[str, Any], document: Any, what: str) -> None:
    """Raise BadRequest when `document` (a JSON body or a query dict) breaks `schema`."""
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path)
    place = f"{what} field {where!r}" if where else what
    raise errors.BadRequest(f"invalid {place}: {error.message}")


def query_schema(properties: dict[str, Any]) -> dict[str, Any]:
    """A query string: each parameter once, only the known ones (values are strings)."""
    return {"type": "object", "properties": properties, "additionalProperties": False}
