"""The `k2` command: one entry point whose subcommands import their package only when run.

The operator therefore starts without torch, and a worker without kopf.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# (group, command) -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("crds", "generate"): ("k2_api.crds_cli:main", "write the CRD YAML generated from the API models"),
    ("operator", "run"): ("k2_operator.main:main", "run the operator (kopf)"),
    ("eplb", "run"): ("k2_eplb.controller:main", "run the EPLB controller"),
    ("eplb", "bench"): ("k2_eplb.bench:main", "benchmark the placement solver against the published greedy baseline"),
    ("worker", "train"): ("k2_workers.train.cli:main", "run a training worker (under torchrun or in a K2Training pod)"),
    ("worker", "serve"): ("k2_workers.serve.cli:main", "run a serving worker (in a K2Serving pod)"),
}
# one-word commands: `k2 run -f FILE.yaml`
SINGLE: dict[str, tuple[str, str]] = {
    "run": ("k2_workers.ray_run.cli:main", "run a K2Training or K2Serving on Ray (-f FILE; local instance by default)"),
}


def usage() -> str:
    lines = ["usage: k2 <group> <command> [options]", "", "commands:"]
    lines += [f"  k2 {group + ' ' + command:<16} {help_text}" for (group, command), (_, help_text) in COMMANDS.items()]
    lines += [f"  k2 {command:<16} {help_text}" for command, (_, help_text) in SINGLE.items()]
    return "\n".join(lines)


def resolve(target: str) -> Callable[[list[str]], int]:
    module_name, function_name = target.split(":")
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    return function


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in SINGLE:
        return resolve(SINGLE[args[0]][0])(args[1:])
    if len(args) < 2 or (args[0], args[1]) not in COMMANDS:
        print(usage(), file=sys.stderr if args[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    target, _ = COMMANDS[(args[0], args[1])]
    return resolve(target)(args[2:])


if __name__ == "__main__":
    sys.exit(main())
