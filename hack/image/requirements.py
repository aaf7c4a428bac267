"""Print the project's pip requirements (its dependencies plus the named extras), one a line, from pyproject.toml.

Both image builders install these into the image's venv before the project itself, so the huge dependency layer
(torch) is cached apart from the small project layer. Standalone (standard library only): the Dockerfile and the
debootstrap builder run it inside the image with Debian's python3.

    python3 requirements.py pyproject.toml workers
"""

from __future__ import annotations

import re
import sys
import tomllib

_SELF_EXTRA = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)\[(?P<extras>[^\]]+)\]\s*$")


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """The dependency specifiers of the project and of `extras`, in order, without duplicates.

    An extra that names the project itself (`k2-operator[workers]`) is expanded in place.
    """
    project = tomllib.loads(pyproject)["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    own_name = _canonical(project["name"])
    out: list[str] = []

    def add(specs: list[str]) -> None:
        for spec in specs:
            match = _SELF_EXTRA.match(spec)
            if match and _canonical(match["name"]) == own_name:
                add(_extra(optional, [e.strip() for e in match["extras"].split(",")]))
            elif spec not in out:
                out.append(spec)

    add(list(project.get("dependencies", [])))
    add(_extra(optional, extras))
    return out


def _extra(optional: dict[str, list[str]], extras: list[str]) -> list[str]:
    missing = [e for e in extras if e not in optional]
    if missing:
        raise ValueError(f"extras: {missing} not in [project.optional-dependencies] ({sorted(optional)})")
    return [spec for e in extras for spec in optional[e]]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print("usage: requirements.py PYPROJECT [EXTRA...]", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        print("\n".join(requirements(f.read(), argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
