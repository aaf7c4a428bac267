"""Expert-parallel load balancing: a pure placement solver, the published baseline, and the controller."""
