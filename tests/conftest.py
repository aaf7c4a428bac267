"""Shared pytest configuration. Fixtures for the local control plane live in tests/fixtures_cluster.py."""
