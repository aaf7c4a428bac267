"""The repository's only top-level conftest: it registers the shared fixtures for tests/ and e2e/ alike.

pytest accepts `pytest_plugins` only in the rootdir conftest; the fixtures themselves are in tests/support/fixtures.py.
"""

pytest_plugins = ["tests.support.fixtures"]
