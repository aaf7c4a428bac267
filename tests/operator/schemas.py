"""JSON schemas for `kubeconform -strict`, made offline: from our CRDs, and for built-in kinds from the local
kube-apiserver's /openapi/v2 (kubeconform's default schema location is on the internet, which tests never reach).

File names follow kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` convention: `deployment-apps-v1.json`,
`service-v1.json`, `k2serving-k2-v1alpha1.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def file_name(group: str, version: str, kind: str) -> str:
    suffix = f"-{group.split('.')[0]}" if group else ""
    return f"{kind.lower()}{suffix}-{version}.json"


def strict(schema: Any) -> Any:
    """Every object schema with properties rejects unknown fields (what kubeconform's -strict schemas do)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def from_crd(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """file name -> schema, one per served version of a CustomResourceDefinition."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    schemas = {}
    for version in spec["versions"]:
        schema = json.loads(json.dumps(version["schema"]["openAPIV3Schema"]))
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        properties["kind"] = {"type": "string", "enum": [kind]}
        properties["metadata"] = {"type": "object"}
        schemas[file_name(group, version["name"], kind)] = strict(schema)
    return schemas


def _expand(schema: Any, definitions: dict[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(schema, list):
        return [_expand(s, definitions, stack) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix("#/definitions/")
        if name.endswith("util.intstr.IntOrString"):
            return INT_OR_STRING
        if name.endswith("api.resource.Quantity"):
            return QUANTITY
        if name in stack:  # recursive types (JSONSchemaProps) are not in the chart: accept anything there
            return {}
        return _expand(definitions[name], definitions, (*stack, name))
    return {k: _expand(v, definitions, stack) for k, v in schema.items()}


def from_openapi_v2(document: dict[str, Any], kinds: set[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """file name -> standalone strict schema for each (group, version, kind) in `kinds`."""
    definitions = document["definitions"]
    schemas = {}
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            key = (gvk.get("group", ""), gvk["version"], gvk["kind"])
            if key in kinds:
                schemas[file_name(*key)] = strict(_expand(definition, definitions, (name,)))
    return schemas


def write(schemas: dict[str, dict[str, Any]], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas.items():
        (directory / name).write_text(json.dumps(schema))
