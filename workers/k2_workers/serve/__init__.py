"""The serving worker: a K2 expert-parallel group rank that applies ExpertPlacement generations live, and the
frontend that routes requests across the groups.

Modules, by role:
- `cli`: `k2 worker serve` flags; dispatches to a rank or the frontend (no torch).
- `frontend`: routes generate requests across the groups, skipping dead ones (no torch).
- `request`: a generate request's parameters and body parsing (no torch).
- `endpoints`: the HTTP server both run, an ASGI app (`http_app`) on uvicorn, for routes of `http_routes` (no torch).
- `rank`: a rank's process: model, process group, HTTP, /metrics, the placement poll loop.
- `rank_routes`: a rank's HTTP routes over its engine.
- `engine`: one rank of a group decoding a continuous batch in lockstep; composes the modules below.
- `step_loop`: the request queue and the decoding thread that runs step after step (`scheduler`: the static
  batch queue it replaced, kept for comparison).
- `batcher`: which tokens of which sequences each step computes (chunked prefill, admission, preemption; pure).
- `blocks`: the paged cache's block tables, free list and prefix sharing (pure); `step_runner`: a step's forwards.
- `engine_metrics`: the engine's queue, batch, cache and latency metrics.
- `wire`: what rank 0 broadcasts to the other ranks (steps, placements, stop) and its encoding.
- `resharding`: applying a new placement (plan the moves, exchange experts rank to rank, read the rest).
- `load`: per-expert and per-slot token counts, handed to `metrics`.
- `metrics`: the Prometheus collector and /metrics server.
- `placement`: the placement file as the operator mounts it.
- `report`: the applied-generation annotation on the rank's own pod.
"""
