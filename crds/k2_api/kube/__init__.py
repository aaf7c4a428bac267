"""The one Kubernetes adapter of the control plane (operator and EPLB controller).

- `protocol.Kube`: the calls they make (get, list, apply, apply_status, create, merge_patch, delete, event);
- `client.connect()` / `client.KubeClient`: the implementation over the official `kubernetes` client, the only
  module that imports it (import it explicitly: this package does not, so `import k2_api.kube` stays light);
- `fake.FakeCluster`: an in-memory API server with the same semantics, for unit tests;
- `errors`: NotFound, Conflict, AlreadyExists, Forbidden, Invalid, Unavailable, all `KubeError`.
"""

from k2_api.kube.errors import AlreadyExists, Conflict, Forbidden, Invalid, KubeError, NotFound, Unavailable
from k2_api.kube.protocol import Kube, Object, ObjectRef, Selector

__all__ = [
    "AlreadyExists",
    "Conflict",
    "Forbidden",
    "Invalid",
    "Kube",
    "KubeError",
    "NotFound",
    "Object",
    "ObjectRef",
    "Selector",
    "Unavailable",
]
