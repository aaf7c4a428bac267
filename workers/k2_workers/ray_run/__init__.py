"""`k2 run -f FILE.yaml`: a K2Training or K2Serving manifest run on Ray instead of Kubernetes (docs/ray.md).

The same worker code as the pods: training is `k2_workers.train.loop.train` inside a Ray Train `TorchTrainer`, one
rank per Ray Train worker; serving is `k2_workers.serve.rank.run_rank` in rank actors, one placement group per
group, behind `k2_workers.serve.frontend`. Without an address the run starts a local Ray instance on 127.0.0.1.
"""
