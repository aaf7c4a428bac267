"""`k2 crds generate`: write the CRD YAML (k2_api.generate) and refresh docs/api.md's tables (k2_api.docs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from k2_api.docs import update_api_doc
from k2_api.generate import generated_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k2 crds generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("crds"), help="directory for the CRD YAML (default crds/)")
    parser.add_argument("--docs", type=Path, default=None, help="also refresh the generated tables of this api.md")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any output is out of date")
    args = parser.parse_args(argv)

    stale: list[Path] = []
    outputs = {args.out / name: text for name, text in generated_files().items()}
    if args.docs is not None:
        outputs[args.docs] = update_api_doc(args.docs.read_text())
    for path, text in outputs.items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0
