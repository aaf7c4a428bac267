"""Tests of the operator: pure builders and decisions, and the operator against the local control plane."""
