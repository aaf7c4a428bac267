"""The serving worker: a K2 expert-parallel group rank that applies ExpertPlacement generations live."""
