"""Where a worker pod finds a storage URI: the one resolver of training and serving, and the claims' mount points.

The operator mounts every claim a `pvc://<claim>/<path>` URI names read-only at `mount_path(claim)` on the worker
pods; `local_path` turns the URI into the path the worker reads there (parsing: `k2_api.uris`).
"""

from __future__ import annotations

from k2_api import uris
from k2_api.contract import Files


def mount_path(claim: str) -> str:
    """The mount point of `claim` on a worker pod."""
    return uris.StorageUri(claim=claim, path="").local_path(Files.CLAIMS_ROOT)


def local_path(uri: str, field: str) -> str:
    """The path a worker pod reads `uri` at: a local path as it is, a claim's path under its mount point.

    Raises ValueError naming `field` for a URI that is not one of the forms `k2_api.uris` accepts."""
    return uris.parse(uri, field).local_path(Files.CLAIMS_ROOT)
