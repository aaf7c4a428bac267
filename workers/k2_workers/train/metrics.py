"""Prometheus metrics of a training run, served by rank 0 (port 0 disables them; -1 picks a free port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrainMetrics:
    """One registry per run (not the process-global one), so tests can build several."""

    def __init__(self, training: str, port: int = 0, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        labels = ["training"]
        self._labels = {"training": training}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.step = gauge("k2_train_step", "Last completed optimizer step")
        self.loss = gauge("k2_train_loss", "Training loss of the last step (mean over ranks)")
        self.lr = gauge("k2_train_learning_rate", "Learning rate of the last step")
        self.tokens_per_second = gauge("k2_train_tokens_per_second", "Global training throughput of the last step")
        self.max_attention_logit = gauge("k2_train_max_attention_logit", "Largest pre-softmax attention logit")
        self.clipped_heads = gauge("k2_train_qk_clipped_heads", "Attention heads QK-Clip rescaled in the last step")
        self.grad_norm = gauge("k2_train_grad_norm", "Global gradient norm before clipping")
        self.last_checkpoint_step = gauge("k2_train_last_checkpoint_step", "Step of the newest complete checkpoint")
        self.tokens = Counter("k2_train_tokens", "Tokens trained on (all ranks)", labels, registry=self.registry)
        self.expert_tokens = Counter(
            "k2_train_expert_tokens",
            "Tokens routed to a logical expert (all ranks)",
            [*labels, "layer", "expert"],
            registry=self.registry,
        )
        self._server = None
        if port:
            self._server, _ = start_http_server(max(port, 0), addr=addr, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The port metrics are served on (None when off)."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_step(self, record: dict[str, float], num_tokens: int, expert_counts: list[list[float]] | None) -> None:
        labels = self._labels
        self.step.labels(**labels).set(record["step"])
        self.loss.labels(**labels).set(record["loss"])
        self.lr.labels(**labels).set(record["lr"])
        self.tokens_per_second.labels(**labels).set(record["tokens_per_s"])
        self.max_attention_logit.labels(**labels).set(record["max_attn_logit"])
        self.clipped_heads.labels(**labels).set(record["clipped_heads"])
        self.grad_norm.labels(**labels).set(record["grad_norm"])
        self.tokens.labels(**labels).inc(num_tokens)
        for layer, row in enumerate(expert_counts or []):
            for expert, count in enumerate(row):
                if count:
                    self.expert_tokens.labels(**labels, layer=str(layer), expert=str(expert)).inc(count)

    def observe_checkpoint(self, step: int) -> None:
        self.last_checkpoint_step.labels(**self._labels).set(step)
