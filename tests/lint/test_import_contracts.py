"""The custom import-linter contract of hack/lint (a forbidden submodule of an external package), on real imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "hack" / "lint"))
from k2_import_contracts import names_submodule


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("import torch.distributed as dist", True),
        ("import torch.distributed", True),
        ("from torch.distributed import ProcessGroup", True),
        ("from torch.distributed.tensor import DTensor", True),
        ("from torch import distributed as dist", True),
        ("from torch import nn, distributed", True),
        ("import torch", False),
        ("from torch import nn", False),
        ("import torch.nn.functional as F", False),
        ("from torch.distributions import Normal", False),
        ("import torch.distributed_extra", False),
    ],
)
def test_names_submodule(line: str, expected: bool) -> None:
    assert names_submodule(line, "torch.distributed") is expected


def _lint(tmp_path: Path, model_source: str) -> subprocess.CompletedProcess[str]:
    package = tmp_path / "pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "layer.py").write_text(textwrap.dedent(model_source))
    (tmp_path / "setup.cfg").write_text(
        textwrap.dedent(
            """\
            [importlinter]
            root_package = pkg
            include_external_packages = True
            contract_types =
                forbidden_external_submodules: k2_import_contracts.ForbiddenExternalSubmodulesContract

            [importlinter:contract:model]
            name = the model imports no torch.distributed
            type = forbidden_external_submodules
            source_modules = pkg.model
            forbidden_modules = torch.distributed
            """
        )
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT / 'hack' / 'lint'}", "PATH": "/usr/bin:/bin"}
    lint_imports = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )


def test_lint_imports_fails_on_a_forbidden_submodule(tmp_path: Path) -> None:
    broken = _lint(tmp_path, "import torch\nimport torch.distributed as dist\n")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "pkg.model.layer imports torch.distributed" in broken.stdout


def test_lint_imports_keeps_a_clean_model(tmp_path: Path) -> None:
    kept = _lint(tmp_path, "import torch\nfrom torch import nn\n")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout
