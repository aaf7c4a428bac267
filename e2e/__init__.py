"""Cluster-agnostic end-to-end suite: K2_E2E_KUBECONFIG, else the local control plane."""
