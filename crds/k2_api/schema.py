"""Pydantic JSON schema -> Kubernetes structural OpenAPI v3 schema.

Kubernetes accepts a subset of OpenAPI v3 for CRDs: no `$ref`, no `title`-free-for-all `anyOf`, no
`additionalProperties: false`, boolean `exclusiveMinimum`/`exclusiveMaximum`, and every node typed unless it preserves
unknown fields. `structural(Model)` rewrites pydantic's output into that form, keeping descriptions, defaults,
bounds, enums and the `x-kubernetes-*` extensions the models carry.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

_DROPPED = ("title", "$defs")
_NULL = {"type": "null"}


def structural(model: type[BaseModel]) -> Schema:
    """The structural schema of a pydantic model (aliases as property names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}))


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline a `$ref` (or a one-element allOf of one); the referring node's own keys win (e.g. description)."""
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **node["allOf"][0]}
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix("#/$defs/")
    outer = {k: v for k, v in node.items() if k != "$ref"}
    return {**_resolve(defs[name], defs), **outer}


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _collapse_any_of(node, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "default" and value is None:
            continue
        if key == "additionalProperties":
            if value is False:
                continue
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
            out[key] = _convert(value, defs)
        elif key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    _fix_exclusive_bounds(out)
    if out.get("type") == "object" and "properties" in out and out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    return out


def _collapse_any_of(node: Schema, defs: dict[str, Schema]) -> Schema:
    """`anyOf: [X, null]` -> X with nullable; `anyOf: [integer, string]` -> x-kubernetes-int-or-string."""
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    options = [_resolve(option, defs) for option in node["anyOf"]]
    nullable = _NULL in options
    options = [option for option in options if option != _NULL]
    if len(options) == 1:
        merged = {**options[0], **outer}
    elif sorted(option.get("type", "") for option in options) == ["integer", "string"]:
        merged = {**outer, "x-kubernetes-int-or-string": True}
    else:
        raise ValueError(f"no structural form for anyOf {node['anyOf']!r}")
    # Optional fields accept an explicit null. Not enums: kube-apiserver (v1.34) rejects null in an enum field even
    # when it is nullable and null is listed, so `nullable` there would only promise what the server refuses.
    if nullable and "enum" not in merged:
        merged["nullable"] = True
    return merged


def _fix_exclusive_bounds(node: Schema) -> None:
    """JSON Schema's numeric exclusive bounds -> OpenAPI 3.0 booleans (integers: the inclusive neighbour)."""
    for exclusive, inclusive, step in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
        value = node.get(exclusive)
        if value is None or isinstance(value, bool):
            continue
        if node.get("type") == "integer":
            node[inclusive] = value + step
            del node[exclusive]
        else:
            node[inclusive] = value
            node[exclusive] = True


def walk(schema: Schema, path: str = "") -> list[tuple[str, Schema]]:
    """(path, node) for every node under schema, depth first; list items appear as `path[]`."""
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += walk(child, f"{path}.{name}" if path else name)
    if "items" in schema:
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found
