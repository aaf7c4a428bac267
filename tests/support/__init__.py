"""Helpers shared by tests/ and e2e/: the cluster handle, kubectl, free ports and waits; fixtures.py is the plugin
that the repository's conftest.py registers."""
