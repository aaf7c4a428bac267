"""Pickle-free encoding of checkpoint state: nested Python values as JSON, tensors by reference.

`split_tensors` replaces every tensor of a nested structure (an optimizer's `state_dict()`) by a reference string and
returns the tensors apart (they go to safetensors files); `join_tensors` puts them back. `dumps`/`loads` write such a
skeleton, or the per-rank extras, as JSON that round-trips exactly what JSON alone cannot: tuples and dicts with
non-string keys (an optimizer's per-parameter state is keyed by int). Decoding builds only dicts, lists, tuples,
strings, numbers, booleans and None, so a checkpoint file can never run code.
"""

from __future__ import annotations

import json
from typing import Any

import torch

TENSOR_REF = "__tensor__:"
_TUPLE = "__tuple__"
_PAIRS = "__dict__"  # a dict whose keys are not all strings, as [[key, value], ...]
_TAGS = (_TUPLE, _PAIRS)
_SCALARS = (str, int, float, bool, type(None))


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list/tuple by a reference string; return (skeleton, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return TENSOR_REF + path
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k!r}") for k, v in node.items()}
        if isinstance(node, list | tuple):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return walk(obj, prefix), tensors


def tensor_refs(skeleton: Any) -> list[str]:
    """The tensor keys a skeleton of `split_tensors` refers to."""
    if isinstance(skeleton, str) and skeleton.startswith(TENSOR_REF):
        return [skeleton.removeprefix(TENSOR_REF)]
    if isinstance(skeleton, dict):
        return [ref for v in skeleton.values() for ref in tensor_refs(v)]
    if isinstance(skeleton, list | tuple):
        return [ref for v in skeleton for ref in tensor_refs(v)]
    return []


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(skeleton, str) and skeleton.startswith(TENSOR_REF):
        return tensors[skeleton.removeprefix(TENSOR_REF)]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        items = [join_tensors(v, tensors) for v in skeleton]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


def to_json(obj: Any, where: str = "value") -> Any:
    """A JSON-ready copy of `obj`; TypeError naming the path of anything that is not a plain value."""
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: to_json(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {_PAIRS: [[to_json(k, f"{where} key"), to_json(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise TypeError(f"{where} is a {type(obj).__name__}: checkpoint state must be JSON values (lists, not tensors)")


def from_json(obj: Any) -> Any:
    """The inverse of `to_json`."""
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and _TUPLE in obj:
            return tuple(from_json(v) for v in obj[_TUPLE])
        if len(obj) == 1 and _PAIRS in obj:
            return {_hashable(from_json(k)): from_json(v) for k, v in obj[_PAIRS]}
        return {k: from_json(v) for k, v in obj.items()}
    return obj


def dumps(obj: Any, where: str = "value") -> str:
    return json.dumps(to_json(obj, where), sort_keys=False) + "\n"


def loads(text: str | bytes) -> Any:
    """Raises ValueError (json.JSONDecodeError, UnicodeDecodeError) on anything that is not this encoding's JSON."""
    return from_json(json.loads(text))


def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # a tuple key is decoded as a tuple already; a list key cannot have been written
        raise ValueError("a dict key in checkpoint JSON is a list")
    return key
