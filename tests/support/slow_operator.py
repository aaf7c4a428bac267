"""`python -m tests.support.slow_operator --apply-delay S -- <k2 operator run args>`: the real operator on the real
adapter, with every server-side apply delayed by S seconds (through `k2_operator.main.main(argv, kube=...)`)."""

from __future__ import annotations

import argparse
import sys

from k2_api.kube.client import connect
from k2_operator.kube import FIELD_MANAGER
from k2_operator.main import main as operator_main
from tests.support.slow_kube import SlowApplyKube


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.slow_operator", description=__doc__)
    parser.add_argument("--apply-delay", type=float, default=0.0, help="seconds before every apply (default 0)")
    parser.add_argument("operator_args", nargs=argparse.REMAINDER, help="-- then the arguments of `k2 operator run`")
    args = parser.parse_args(argv)
    operator_args = args.operator_args[1:] if args.operator_args[:1] == ["--"] else args.operator_args
    kube = connect(field_manager=FIELD_MANAGER)
    return operator_main(operator_args, kube=SlowApplyKube(kube, args.apply_delay) if args.apply_delay else kube)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
