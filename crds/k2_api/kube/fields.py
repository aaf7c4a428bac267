"""Objects as flat maps from field paths to leaf values, the form in which the fake tracks field ownership.

A path is a tuple of map keys and `Item`s: an `Item` names one element of an associative list (a list-map, such as
`status.conditions` keyed by `type`); every other list is atomic, one leaf, as in the API server's structural
merge. `fields_v1` renders a set of paths the way `metadata.managedFields[].fieldsV1` shows them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple


class Item(NamedTuple):
    """The element of a list-map whose `key` field equals `value`."""

    key: str
    value: Any


Path = tuple[str | Item, ...]

LIST_MAP_KEYS: dict[str, str] = {"conditions": "type", "layers": "layer", "ownerReferences": "uid"}
"""Field name -> key of the list-maps the control plane shares between managers (metav1 conditions, the
ExpertPlacement's `spec.layers`); the field name alone identifies them in the kinds the adapter knows."""


def flatten(value: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Leaf paths of `value`; an empty map or list is a leaf of its own."""
    if isinstance(value, Mapping):
        if not value:
            return {prefix: {}}
        flat: dict[Path, Any] = {}
        for key, child in value.items():
            flat.update(_flatten_child(key, child, (*prefix, key)))
        return flat
    return {prefix: value}


def _flatten_child(key: str, child: Any, path: Path) -> dict[Path, Any]:
    map_key = LIST_MAP_KEYS.get(key)
    if map_key and isinstance(child, list) and child and all(isinstance(e, Mapping) and map_key in e for e in child):
        flat: dict[Path, Any] = {}
        for element in child:
            flat.update(flatten(element, (*path, Item(map_key, element[map_key]))))
        return flat
    return flatten(child, path)


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """The inverse of `flatten` (list-map elements in first-seen order)."""
    root: dict[Any, Any] = {}
    for path, value in flat.items():
        node = root
        for element in path[:-1]:
            node = node.setdefault(element, {})
        node[path[-1]] = value
    built = _build(root)
    assert isinstance(built, dict)
    return built


def _build(node: Any) -> Any:
    if not isinstance(node, dict) or not node:
        return node
    if all(isinstance(key, Item) for key in node):
        return [_build(child) for child in node.values()]
    return {key: _build(child) for key, child in node.items()}


def set_leaf(flat: dict[Path, Any], path: Path, value: Any) -> None:
    """Sets one leaf, dropping what it replaces (a leaf above it, or a subtree below unless `value` is empty)."""
    for cut in range(1, len(path)):
        flat.pop(path[:cut], None)
    below = [p for p in flat if len(p) > len(path) and p[: len(path)] == path]
    if below and value in ({}, []):
        return
    for p in below:
        del flat[p]
    flat[path] = value


def remove(flat: dict[Path, Any], path: Path) -> None:
    for p in [p for p in flat if p[: len(path)] == path]:
        del flat[p]


def fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    """`{"f:spec": {"f:generation": {}}, ...}`; list-map elements as `k:{"type":"Ready"}` with a `.` entry."""
    tree: dict[str, Any] = {}
    for path in sorted(paths, key=repr):
        node = tree
        for element in path:
            if isinstance(element, Item):
                node = node.setdefault("k:" + json.dumps({element.key: element.value}, separators=(",", ":")), {})
                node.setdefault(".", {})
            else:
                node = node.setdefault(f"f:{element}", {})
    return tree


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key; lists are replaced whole)."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
