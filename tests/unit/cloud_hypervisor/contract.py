"""The API description (``api.json``) as a checker: is this request, this answer, allowed?

Schemas are OpenAPI 3.0's, which is JSON Schema draft 4 with a few extras;
``jsonschema`` validates them with the whole document as the root, so
``#/components/schemas/...`` references resolve as they do in the document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

DESCRIPTION = Path(__file__).with_name("api.json")
API_ROOT = "/api/v1/"


class Contract:
    """What the description allows: paths, methods, request bodies, statuses and answers."""

    def __init__(self, path: Path = DESCRIPTION) -> None:
        self.document: dict[str, Any] = json.loads(path.read_text())
        self.paths: dict[str, Any] = self.document["paths"]

    def operation(self, method: str, endpoint: str) -> dict[str, Any] | None:
        """The operation for ``method`` on ``endpoint`` (``vm.boot``), None if not described."""
        item = self.paths.get("/" + endpoint)
        return None if item is None else item.get(method.lower())

    def request_problems(self, method: str, endpoint: str, body: bytes) -> list[str]:
        """Why this request breaks the description (empty: it keeps it)."""
        op = self.operation(method, endpoint)
        if op is None:
            return [f"{method} {endpoint} is not in the description"]
        declared = op.get("requestBody")
        if declared is None:
            return [f"{method} {endpoint} takes no body, got {len(body)} bytes"] if body else []
        if not body:
            return [f"{method} {endpoint} needs a body"] if declared.get("required") else []
        try:
            value = json.loads(body)
        except ValueError as exc:
            return [f"{method} {endpoint}: body is not JSON: {exc}"]
        schema = declared["content"]["application/json"]["schema"]
        return [f"{method} {endpoint}: {p}" for p in self.schema_problems(schema, value)]

    def response_problems(self, method: str, endpoint: str, status: int, body: Any) -> list[str]:
        """Why this answer is not one the description lists for the operation."""
        op = self.operation(method, endpoint)
        if op is None:
            return []
        declared = op["responses"].get(str(status))
        if declared is None:
            return [f"{method} {endpoint} never answers {status}"]
        content = declared.get("content")
        if content is None:
            return [f"{method} {endpoint} {status} has no body"] if body is not None else []
        schema = content["application/json"]["schema"]
        return [f"{method} {endpoint} {status}: {p}" for p in self.schema_problems(schema, body)]

    def schema_problems(self, schema: dict[str, Any], value: Any) -> list[str]:
        """``value`` against ``schema`` (which may be a ``$ref`` into the document)."""
        root = {**schema, "components": self.document["components"]}
        validator = jsonschema.Draft4Validator(root)
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
            for error in validator.iter_errors(value)
        ]
