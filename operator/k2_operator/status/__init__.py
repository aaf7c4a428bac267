"""Pure decisions and status of each kind: `(resource, observed, now) -> plan` with no I/O."""
