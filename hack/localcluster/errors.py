"""The one error type of the local cluster."""


class ClusterError(RuntimeError):
    """A component failed to start or the cluster is not usable; the message names the log to read."""
