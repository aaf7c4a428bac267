"""The kopf operator that reconciles K2Training, K2Serving and ExpertPlacement into Kubernetes objects."""
