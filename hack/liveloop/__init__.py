"""The live loop on a running cluster: install the chart, run a K2Serving, drive skewed traffic through its frontend,
and watch the EPLB controller rebalance it. `make demo` (demo.py), the live-loop e2e tests (e2e/) and the live
benchmark (benchmarks/live_loop.py) share these pieces; none of them imports the test suite."""
