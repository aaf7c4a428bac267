"""Pure builders of the child objects: `(resource, observed) -> manifest dict`."""
