"""The K2 API (group k2.ai, version v1alpha1): pydantic models of K2Training, K2Serving and ExpertPlacement.

These models are the single source of truth; the CRD YAML in crds/ is generated from them.
"""
