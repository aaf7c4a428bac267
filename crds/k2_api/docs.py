"""Field reference tables of docs/api.md, generated from the same structural schemas as the CRDs.

docs/api.md is hand-written prose with generated blocks between `<!-- BEGIN GENERATED: <Kind> -->` and
`<!-- END GENERATED: <Kind> -->`; `update_api_doc` refreshes the blocks and keeps everything else.
"""

from __future__ import annotations

import json
import re

from k2_api.generate import MODELS, open_api_schema
from k2_api.schema import Schema, walk

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\w+) -->\n).*?(<!-- END GENERATED: \2 -->)", re.DOTALL)


def _type_name(node: Schema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    type_ = node.get("type")
    if type_ == "array":
        return f"[]{_type_name(node['items'])}"
    if type_ == "object":
        if "properties" in node:
            return "object"
        if isinstance(node.get("additionalProperties"), dict):
            return f"map[string]{_type_name(node['additionalProperties'])}"
        return "free-form object"
    return f"{type_} ({node['format']})" if "format" in node else str(type_ or "any")


def _constraints(node: Schema) -> list[str]:
    notes = []
    if "enum" in node:
        notes.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        left = "(" if node.get("exclusiveMinimum") else "["
        right = ")" if node.get("exclusiveMaximum") else "]"
        notes.append(f"range {left}{low}, {high}{right}")
    elif low is not None:
        notes.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {low}")
    elif high is not None:
        notes.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {high}")
    for key, label in (("minLength", "min length"), ("maxLength", "max length"), ("maxItems", "max items")):
        if key in node:
            notes.append(f"{label} {node[key]}")
    if "x-kubernetes-list-map-keys" in node:
        notes.append("list map keyed by " + ", ".join(node["x-kubernetes-list-map-keys"]))
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") == "object" and "properties" in node:
        notes.append("other fields kept as given")
    return notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(node: Schema) -> str:
    return f"`{json.dumps(node['default'], sort_keys=True)}`" if "default" in node else ""


def field_table(root: Schema, top: str) -> list[str]:
    """Markdown rows for every field under root (named from `top`, e.g. spec)."""
    lines = ["| Field | Type | Required | Default | Description |", "|---|---|---|---|---|"]
    required_at: dict[str, set[str]] = {}
    for path, node in walk(root, top):
        required_at[path] = set(node.get("required", []))
        if path == top or path.endswith("[]") or path.endswith("{}"):
            continue
        parent, _, name = path.rpartition(".")
        required = "yes" if name in required_at.get(parent, set()) else ""
        text = " ".join([node.get("description", ""), *(f"({note})" for note in _constraints(node))]).strip()
        lines.append(f"| `{path}` | {_type_name(node)} | {required} | {_default(node)} | {_cell(text)} |")
    return lines


def rule_list(root: Schema) -> list[str]:
    """The CEL rules of the kind, where they sit and what the API server says when they fail."""
    lines = []
    for path, node in walk(root):
        for rule in node.get("x-kubernetes-validations", []):
            where = f"`{path}`" if path else "the object"
            lines.append(f"- on {where}: `{rule['rule']}` — *{rule['message']}*")
    return lines


def kind_block(kind: str) -> str:
    schema = open_api_schema(kind)
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    lines = ["#### spec", "", *field_table(spec, "spec"), "", "#### status", "", *field_table(status, "status")]
    lines += ["", "#### Validation rules (CEL, checked by the API server)", "", *rule_list(schema)]
    return "\n".join(lines) + "\n"


def update_api_doc(text: str) -> str:
    """text with every generated block replaced by the current tables; unknown kinds are an error."""

    def replace(match: re.Match[str]) -> str:
        kind = match.group(2)
        if kind not in MODELS:
            raise ValueError(f"docs/api.md: unknown generated block {kind!r}")
        return match.group(1) + kind_block(kind) + match.group(3)

    return _BLOCK.sub(replace, text)
