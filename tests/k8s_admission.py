"""What the API server does with a custom resource on create/update, read off the CRD alone.

Independent of the pydantic models on purpose: tests run a manifest through both and check they
agree. Order as in the API server: reject unknown fields (kubectl's default --validate=strict),
apply structural defaults, validate the OpenAPI schema, then evaluate the CEL rules (transition rules
only on update, where the old value exists).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import celpy
from openapi_schema_validator import OAS30Validator


class Admission:
    def __init__(self, crd: dict[str, Any]):
        self.schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
        """The object as it would be stored, and the errors as 'path: message' (empty if admitted)."""
        obj = copy.deepcopy(obj)
        errors = list(unknown_fields(obj, self.schema, ""))
        apply_defaults(obj, self.schema)
        for error in OAS30Validator(self.schema).iter_errors(obj):
            errors.append(f"{_path(error.absolute_path)}: {error.message}")
        if not errors:
            errors.extend(cel_errors(obj, old, self.schema, ""))
        return obj, errors


def unknown_fields(value: Any, schema: dict[str, Any], path: str):
    if isinstance(value, dict) and "properties" in schema:
        for key, child in value.items():
            if key not in schema["properties"]:
                yield f"{_join(path, key)}: unknown field"
            elif key != "metadata":
                yield from unknown_fields(child, schema["properties"][key], _join(path, key))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


def apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, child_schema in schema.get("properties", {}).items():
            if value.get(key) is None and "default" in child_schema:
                value[key] = copy.deepcopy(child_schema["default"])
            if key in value:
                apply_defaults(value[key], child_schema)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(item, schema["items"])


def cel_errors(value: Any, old: Any, schema: dict[str, Any], path: str):
    for rule in schema.get("x-kubernetes-validations", []):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if is_transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        if not _program(rule["rule"]).evaluate(activation):
            yield f"{path + rule.get('fieldPath', '')}: {rule['message']}"
    if isinstance(value, dict):
        for key, child_schema in schema.get("properties", {}).items():
            if key in value:
                child_old = old.get(key) if isinstance(old, dict) else None
                yield from cel_errors(value[key], child_old, child_schema, _join(path, key))
    elif isinstance(value, list) and "items" in schema:
        # Items are matched to old items by position; the API server does so for non-map lists too.
        for index, item in enumerate(value):
            child_old = old[index] if isinstance(old, list) and index < len(old) else None
            yield from cel_errors(item, child_old, schema["items"], f"{path}[{index}]")


@cache
def _program(expression: str):
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
