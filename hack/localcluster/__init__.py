"""A real Kubernetes control plane on loopback, for tests and local runs (see hack/local_cluster.py).

Modules, bottom up: `errors`, `layout` (where files live, state on disk), `pki` (certificates, kubeconfig), `nodes`
(address plan, fake GPU node manifests), `processes` (spawn, own, stop), `api` (admin HTTP calls on loopback),
`controlplane` (the components' command lines), `cluster` (up/down orchestration) and `cli`.
"""
