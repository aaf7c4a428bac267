"""Reading the manifest `k2 run` was given: the first K2Training or K2Serving document, validated by the API models
that admission uses, with errors that name the field (`spec.numNodes: Input should be ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from k2_api.serving import K2Serving
from k2_api.training import K2Training

KINDS = ("K2Training", "K2Serving")


def field_errors(error: ValidationError) -> str:
    """One `path: message` per error, the path in the manifest's own (camelCase) field names."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        lines.append(f"{path}: {item['msg']}" if path else item["msg"])
    return "; ".join(lines)


def first_document(documents: list[Any], source: str) -> dict[str, Any]:
    """The first document whose kind `k2 run` knows."""
    for document in documents:
        if isinstance(document, dict) and document.get("kind") in KINDS:
            return document
    raise ValueError(f"{source}: no {' or '.join(KINDS)} document found")


def validate(document: dict[str, Any]) -> K2Training | K2Serving:
    """The API model of the document; ValueError naming the field when admission would reject it."""
    model = K2Training if document.get("kind") == "K2Training" else K2Serving
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise ValueError(field_errors(error)) from None


def load(path: str | Path) -> tuple[dict[str, Any], K2Training | K2Serving]:
    """The raw document (what the workers read, as in the pods) and its validated model."""
    with open(path) as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    document = first_document(documents, str(path))
    return document, validate(document)
