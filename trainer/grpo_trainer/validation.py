"""Validate a GRPORun manifest the way the API server would, with messages that name the field.

Two passes, the same two the API server makes: the structural schema (pydantic, from which the CRD's
OpenAPI schema is generated) and then the cross-field CEL rules, evaluated with cel-python on exactly
the expressions the CRD carries. Every problem is reported, not just the first.

The schema pass takes a tenth of a millisecond; the CEL rules take tens (cel-python interprets
them). A spec that passed them is remembered by its :func:`cel_digest`, a hash of the spec as the
rules see it and of the rules themselves: the same spec checked against the same rules is not
checked again, in this process or, where the caller kept the digest (the operator does, in the
run's status), in the next one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from grpo_trainer.spec import APIModel, GRPORun, GRPORunSpec


@dataclass(frozen=True)
class FieldError:
    path: str  # e.g. "spec.grpo.epsilonHigh" or "spec.rewards[1].name"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    """A manifest that is not a valid GRPORun; ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[FieldError]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {error}" for error in errors)
        super().__init__(f"{source}: not a valid GRPORun ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{lines}")


class _Loader(yaml.SafeLoader):
    """YAML as kubectl reads it: PyYAML's YAML 1.1 takes `1e-6` for a string, YAML 1.2 a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


MAX_MANIFEST_BYTES = 1 << 20
"""A manifest larger than this is refused unread: the API server takes objects of about 1.5 MB."""
MAX_YAML_NODES = 100_000
"""The most values a manifest may hold once its aliases are expanded (a GRPORun has a few hundred)."""


def load_manifest(path: str | Path) -> GRPORun:
    """Read a GRPORun from a YAML file, or raise ManifestError naming the file and each bad field.

    The file is read within bounds, as a hostile one may be: at most MAX_MANIFEST_BYTES of UTF-8,
    and at most MAX_YAML_NODES values with aliases expanded (a few hundred bytes of nested anchors,
    the "billion laughs" of Kubernetes' CVE-2019-11253, would otherwise take minutes to validate).
    """
    path = Path(path)

    def refuse(message: str) -> ManifestError:
        return ManifestError(str(path), [FieldError("", message)])

    try:
        with path.open("rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise refuse(f"larger than {MAX_MANIFEST_BYTES // 1024} KiB; a GRPORun manifest is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        documents = [doc for doc in _bounded_documents(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise refuse(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise refuse("YAML nested too deeply") from None
    except _TooLarge as exc:
        raise refuse(str(exc)) from None
    if len(documents) != 1:
        raise ManifestError(str(path), [FieldError("", f"expected one YAML document, found {len(documents)}")])
    return validate_manifest(documents[0], source=str(path))


class _TooLarge(Exception):
    pass


def _bounded_documents(text: str):
    """The YAML documents in ``text``, each checked to expand to at most MAX_YAML_NODES values
    before it is built (PyYAML shares an aliased value, so the bomb costs later, in validation)."""
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            assert node is not None  # check_node said a document follows
            if _expanded_size(node) > MAX_YAML_NODES:
                raise _TooLarge(f"its aliases expand to more than {MAX_YAML_NODES:,} values; write the values out")
            yield loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with every alias expanded, counted in linear time."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else []
        )
        if children_done or not children:
            # A cycle (an alias inside its own anchor) counts each node once: the API server refuses it anyway.
            sizes[id(node)] = min(1 + sum(sizes.get(id(child), 1) for child in children), MAX_YAML_NODES + 1)
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def validate_manifest(manifest: Any, source: str = "manifest", *, passed_cel: str | None = None) -> GRPORun:
    """Validate a parsed manifest (a dict) and return the typed run, or raise ManifestError.

    ``passed_cel`` is the cel_digest of a spec known to pass the CEL rules; the CEL rules are not
    evaluated for a spec with that digest, nor for one that passed them earlier in this process.
    The schema is always checked."""
    if not isinstance(manifest, dict):
        raise ManifestError(source, [FieldError("", f"expected a mapping, got {type(manifest).__name__}")])
    try:
        run = GRPORun.model_validate(manifest)
    except ValidationError as exc:
        raise ManifestError(source, [_from_pydantic(error, manifest) for error in exc.errors()]) from None
    digest = cel_digest(run.spec)
    if digest != passed_cel and digest not in _PASSED_CEL:
        errors = list(cel_errors(run.spec, "spec"))
        if errors:
            raise ManifestError(source, errors)
        _PASSED_CEL[digest] = None
        while len(_PASSED_CEL) > PASSED_CEL_REMEMBERED:
            _PASSED_CEL.popitem(last=False)
    return run


PASSED_CEL_REMEMBERED = 10_000
"""How many specs that passed the CEL rules this process remembers (a digest is 64 bytes)."""
_PASSED_CEL: OrderedDict[str, None] = OrderedDict()  # cel_digest → None, oldest first


def cel_digest(spec: GRPORunSpec) -> str:
    """A SHA-256 of the spec as the CEL rules see it (defaults filled in) and of every CEL rule: two
    specs with the same digest get the same verdict from the same rules."""
    seen = json.dumps(spec.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{_rules_text()}\n{seen}".encode()).hexdigest()


@cache
def _rules_text() -> str:
    """Every CEL rule of the spec's models, with the model and field each is on, in a fixed order."""
    rules, models, pending = [], set(), [GRPORunSpec]
    while pending:
        model = pending.pop()
        if model in models:
            continue
        models.add(model)
        rules += [f"{model.__qualname__}{rule.field}: {rule.rule}" for rule in getattr(model, "cel_rules", ())]
        pending += [inner for field in model.model_fields.values() if (inner := inner_model(field.annotation))]
    return "\n".join(sorted(rules))


def cel_errors(model: APIModel, path: str):
    """Yield a FieldError for each CEL rule that ``model`` or any model inside it breaks."""
    if model.cel_rules:
        self_value = _cel_value(model.model_dump(by_alias=True, exclude_none=True, mode="json"))
        for rule in model.cel_rules:
            if not rule.transition and not _compiled(rule.rule).evaluate({"self": self_value}):
                yield FieldError(path + rule.field, rule.message)
    for name, field in type(model).model_fields.items():
        alias = field.alias or name
        value = getattr(model, name)
        if isinstance(value, APIModel):
            yield from cel_errors(value, f"{path}.{alias}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, APIModel):
                    yield from cel_errors(item, f"{path}.{alias}[{index}]")


@cache
def _compiled(expression: str):
    import celpy

    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _cel_value(data: Any):
    from celpy.adapter import json_to_cel

    return json_to_cel(data)


def _from_pydantic(error: ErrorDetails, manifest: dict[str, Any]) -> FieldError:
    location = list(error["loc"])
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    kind = error["type"]
    if kind == "missing":
        return FieldError(path, "required")
    if kind == "extra_forbidden":
        return FieldError(path, "unknown field" + _suggestion(location, manifest))
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and kind not in ("model_type", "dict_type", "list_type"):
        message += f" (got {error['input']!r})"
    return FieldError(path, message)


def _suggestion(location: list[Any], manifest: dict[str, Any]) -> str:
    """' (did you mean X?)' for a misspelt field, from the field names valid at that place."""
    model: type[BaseModel] | None = GRPORun
    for part in location[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = inner_model(field.annotation) if field else None
    if model is None:
        return ""
    names = [field.alias or name for name, field in model.model_fields.items()]
    match = difflib.get_close_matches(str(location[-1]), names, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def inner_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        model = inner_model(argument)
        if model is not None:
            return model
    return None
