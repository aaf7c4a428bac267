"""Tests of the EPLB solver, planner, load readers and controller."""
