"""The worker image, built without Docker or a registry: `python hack/image build|run|import` (see __main__)."""
