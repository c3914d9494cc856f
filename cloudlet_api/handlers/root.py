"""Version discovery at `/` (no token needed), as every OpenStack service answers it."""

from __future__ import annotations

from typing import Any

from cloudlet_api import microversion
from cloudlet_api.context import Request, json_response


def home(req: Request) -> Any:
    return json_response(
        {
            "versions": [
                {
                    "id": "v1.0",
                    "status": "CURRENT",
                    "min_version": str(microversion.MIN_VERSION),
                    "max_version": str(microversion.MAX_VERSION),
                    "links": [{"rel": "self", "href": req.application_url + "/"}],
                }
            ]
        }
    )
