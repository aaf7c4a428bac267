"""An import-linter contract type that import-linter lacks: forbid a *submodule* of an external package.

import-linter's `forbidden` contract only takes external packages at their top level (`torch`, not
`torch.distributed`), because grimp squashes each external package into one node. This contract reads the import
details that grimp keeps for each edge into that node (the source line) and fails on any line that names a forbidden
submodule, e.g. `import torch.distributed as dist` or `from torch import distributed`.

    [[tool.importlinter.contracts]]
    type = "forbidden_external_submodules"
    source_modules = ["k2_workers.model"]
    forbidden_modules = ["torch.distributed"]
"""

from __future__ import annotations

import re
from typing import Any

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def names_submodule(line: str, submodule: str) -> bool:
    """True when an import statement's source line imports `submodule` (dotted) or something below it."""
    package, _, rest = submodule.partition(".")
    head = rest.split(".")[0]
    dotted = re.compile(rf"(^|[\s,]){re.escape(submodule)}(\.|\s|,|$)")
    from_package = re.compile(rf"^\s*from\s+{re.escape(package)}\s+import\s+.*\b{re.escape(head)}\b")
    from_submodule = re.compile(rf"^\s*from\s+{re.escape(submodule)}(\.|\s)")
    return bool(dotted.search(line) or from_package.search(line) or from_submodule.search(line))


class ForbiddenExternalSubmodulesContract(Contract):
    type_name = "forbidden_external_submodules"

    source_modules = fields.SetField(subfield=fields.ModuleExpressionField())
    forbidden_modules = fields.SetField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        sources = {expression.expression for expression in self.source_modules}  # type: ignore[attr-defined]
        forbidden: set[str] = set(self.forbidden_modules)  # type: ignore[arg-type]
        violations: list[dict[str, Any]] = []
        for importer in sorted(graph.modules):
            if not any(importer == s or importer.startswith(s + ".") for s in sources):
                continue
            for submodule in sorted(forbidden):
                package = submodule.split(".")[0]
                if package not in graph.find_modules_directly_imported_by(importer):
                    continue
                for detail in graph.get_import_details(importer=importer, imported=package):
                    if names_submodule(detail["line_contents"], submodule):
                        violations.append({"importer": importer, "submodule": submodule, **detail})
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for violation in check.metadata["violations"]:
            output.print_error(
                f"{violation['importer']} imports {violation['submodule']} "
                f"(l.{violation['line_number']}: {violation['line_contents']})"
            )
            output.new_line()
