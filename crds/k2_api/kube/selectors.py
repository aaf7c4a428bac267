"""Label selectors in the API's string form, and matching them (for the fake)."""

from __future__ import annotations

from collections.abc import Mapping

from k2_api.kube.protocol import Selector


def selector_string(selector: Selector) -> str:
    """`{a: b, c: d}` -> `a=b,c=d` (sorted); a string passes unchanged."""
    if isinstance(selector, str):
        return selector
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


def matches(selector: Selector | None, labels: Mapping[str, str]) -> bool:
    """Equality-based selectors: `k=v`, `k==v`, `k!=v`, `k` (exists), `!k` (absent); set-based ones are refused."""
    if selector is None:
        return True
    for term in filter(None, (t.strip() for t in selector_string(selector).split(","))):
        if " in " in term or " notin " in term or "(" in term:
            raise ValueError(f"selector: set-based term {term!r} is not supported")
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True
