"""What a test does when this machine lacks something it needs: skip on a developer's machine, fail in CI.

`make test` installs and builds everything the suite needs, so in CI (`CI` set, as `.ci/run` runs) a missing tool,
package or image is a broken set-up, never a reason to pass with a test left out.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def skip_or_fail(message: str) -> NoReturn:
    """Skips the test with `message`, or fails it when running under CI."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
