"""Storage URIs of the API (spec.model.checkpointUri, spec.data.uri): parsed once, for admission, operator and workers.

Three forms are accepted:
- `file:///abs/path` or a plain `/abs/path`: a directory the pod already sees (an image path, a volume of your own);
- `pvc://<claim>` or `pvc://<claim>/<path>`: a PersistentVolumeClaim of the resource's namespace, which the operator
  mounts read-only at `Files.CLAIMS_ROOT/<claim>` on every worker pod, and `<path>` inside it.

A claim name is a DNS subdomain (what Kubernetes allows for PVC names); a claim path may not climb out of the claim
with `..`. Anything else (another scheme, a relative path, a host in a file URI) is refused, naming the field. The same
rules run as CEL on the API server (`cel_rules`) and in Python (`parse`), so both give the same answer.
Where a worker finds a URI (`Files.CLAIMS_ROOT` applied) is `k2_api.claims`: this module imports nothing of ours,
because `k2_api.common` validates with it and `k2_api.contract` imports `k2_api.common`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FILE_SCHEME = "file://"
PVC_SCHEME = "pvc://"
MAX_CLAIM_LENGTH = 253

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
CLAIM_PATTERN = rf"{_LABEL}(\.{_LABEL})*"
"""RFC 1123 subdomain: lowercase alphanumerics, '-' and '.', alphanumeric at both ends of every label."""
_CLAIM = re.compile(CLAIM_PATTERN)
_PARENT_CEL = r"(^|/)\.\.(/|$)"
"""A `..` path segment, in RE2 (CEL's `matches`), where `$` is the end of the text only."""

FORMS = "file:///<absolute path>, an absolute path, or pvc://<claim>/<path>"


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage URI: `claim` is None for a local path; `path` is absolute for a local path, and relative to
    the claim's root (normalised, "" for the root itself) for a claim."""

    claim: str | None
    path: str

    def local_path(self, claims_root: str) -> str:
        """Where a worker finds it, with claims mounted under `claims_root`."""
        if self.claim is None:
            return self.path
        root = f"{claims_root.rstrip('/')}/{self.claim}"
        return f"{root}/{self.path}" if self.path else root


def parse(uri: str, field: str) -> StorageUri:
    """The storage URI `uri` of the field `field` (a dotted API path, e.g. spec.model.checkpointUri).

    Raises ValueError naming the field when `uri` is not one of the accepted forms."""
    if uri.startswith(PVC_SCHEME):
        return _parse_claim(uri.removeprefix(PVC_SCHEME), uri, field)
    path = uri.removeprefix(FILE_SCHEME)
    if not path.startswith("/"):
        raise ValueError(f"{field} must be {FORMS}, got {uri!r}")
    return StorageUri(claim=None, path=path)


def _parse_claim(rest: str, uri: str, field: str) -> StorageUri:
    claim, _, path = rest.partition("/")
    if not claim or len(claim) > MAX_CLAIM_LENGTH or _CLAIM.fullmatch(claim) is None:
        raise ValueError(
            f"{field}: {claim!r} in {uri!r} is not a PersistentVolumeClaim name (a DNS subdomain: lowercase letters, "
            f"digits, '-' and '.', at most {MAX_CLAIM_LENGTH} characters)"
        )
    segments = path.split("/")
    if ".." in segments:
        raise ValueError(f"{field}: {uri!r} climbs out of the claim with '..'")
    parts = [part for part in segments if part not in ("", ".")]
    return StorageUri(claim=claim, path="/".join(parts))


def local_only(uri: str, field: str) -> str:
    """The path of a URI that must not name a claim (claims are mounted read-only), e.g. spec.checkpointing.uri."""
    location = parse(uri, field)
    if location.claim is not None:
        raise ValueError(f"{field} must be file:///<absolute path> or an absolute path, got {uri!r}")
    return location.path


def claim_of(uri: str | None, field: str) -> str | None:
    """The claim a URI names, or None (no URI, or a local path)."""
    return None if uri is None else parse(uri, field).claim


def cel_rules(field: str) -> list[dict[str, Any]]:
    """The `x-kubernetes-validations` of a storage-URI string field: the rules `parse` applies."""
    claim = rf"^pvc://{CLAIM_PATTERN}(/(?s:.*))?$"  # (?s): a path may hold any character
    return [
        {
            "rule": f"self.startsWith('/') || self.startsWith('{FILE_SCHEME}/') || self.matches('{_cel(claim)}')",
            "message": f"{field} must be {FORMS} (a claim name is a lowercase DNS subdomain)",
        },
        {
            "rule": f"!self.startsWith('{PVC_SCHEME}') || self.matches('^pvc://[^/]{{1,{MAX_CLAIM_LENGTH}}}(/|$)')",
            "message": f"{field}: a claim name has at most {MAX_CLAIM_LENGTH} characters",
        },
        {
            "rule": f"!self.startsWith('{PVC_SCHEME}') || !self.matches('{_cel(_PARENT_CEL)}')",
            "message": f"{field}: a pvc:// path may not climb out of the claim with '..'",
        },
    ]


def local_cel_rules(field: str) -> list[dict[str, Any]]:
    """The `x-kubernetes-validations` of a string field that `local_only` reads."""
    return [
        {
            "rule": f"self.startsWith('/') || self.startsWith('{FILE_SCHEME}/')",
            "message": f"{field} must be file:///<absolute path> or an absolute path",
        }
    ]


def _cel(pattern: str) -> str:
    """A regular expression inside a single-quoted CEL string literal (backslashes escaped)."""
    return pattern.replace("\\", "\\\\")
