"""The distributed training worker that K2Training pods run (`python -m k2_workers.train --config FILE`)."""
