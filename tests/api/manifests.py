"""Manifests for the API tests: the committed examples, and a table of invalid ones with the field each must name."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

from tests.support.paths import ROOT

EXAMPLES = {
    "K2Training": ROOT / "examples" / "k2training-debug.yaml",
    "K2Serving": ROOT / "examples" / "k2serving-debug.yaml",
}

Manifest = dict[str, Any]
_DELETE = object()


def load_example(kind: str) -> Manifest:
    document: Manifest = yaml.safe_load(EXAMPLES[kind].read_text())
    return document


def placement(num_layers: int = 2, num_experts: int = 4, ranks: int = 2, slots_per_rank: int = 3) -> Manifest:
    table = [[(r * slots_per_rank + s) % num_experts for s in range(slots_per_rank)] for r in range(ranks)]
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "ExpertPlacement",
        "metadata": {"name": "xp-test"},
        "spec": {
            "numLayers": num_layers,
            "numExperts": num_experts,
            "ranks": ranks,
            "slotsPerRank": slots_per_rank,
            "layers": [{"layer": i, "slots": copy.deepcopy(table)} for i in range(num_layers)],
            "generation": 1,
        },
    }


INLINE_CONFIG = {"num_hidden_layers": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "rope_theta": 50000.0}


def edited(manifest: Manifest, **changes: Any) -> Manifest:
    """A deep copy with dotted paths (`spec__model__preset`, list indices as digits) set, or removed with _DELETE."""
    result = copy.deepcopy(manifest)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = result
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return result


@dataclass(frozen=True)
class Invalid:
    id: str
    manifest: Manifest
    field: str  # must appear in the API server's error message (and the Python model must reject the manifest)


def invalid_manifests() -> list[Invalid]:
    training, serving, xp = load_example("K2Training"), load_example("K2Serving"), placement()
    inline = edited(serving, spec__model={"config": dict(INLINE_CONFIG)})
    return [
        # Missing required fields.
        Invalid("training-no-image", edited(training, spec__image=_DELETE), "spec.image"),
        Invalid("training-no-model", edited(training, spec__model=_DELETE), "spec.model"),
        Invalid(
            "serving-config-no-experts",
            edited(inline, spec__model__config__n_routed_experts=_DELETE),
            "spec.model.config.n_routed_experts",
        ),
        Invalid("placement-no-ranks", edited(xp, spec__ranks=_DELETE), "spec.ranks"),
        # Wrong types.
        Invalid("training-nodes-string", edited(training, spec__numNodes="two"), "spec.numNodes"),
        Invalid("serving-suspend-string", edited(serving, spec__suspend="sometimes"), "spec.suspend"),
        Invalid("placement-slots-flat", edited(xp, spec__layers__0__slots=[0, 1, 2]), "spec.layers[layer=0].slots"),
        # Negative or zero counts, out-of-range numbers.
        Invalid("training-nodes-negative", edited(training, spec__numNodes=-1), "spec.numNodes"),
        Invalid(
            "training-max-restarts-negative",
            edited(training, spec__failurePolicy__maxRestarts=-1),
            "spec.failurePolicy.maxRestarts",
        ),
        Invalid("serving-groups-zero", edited(serving, spec__groups=0), "spec.groups"),
        Invalid("serving-port-too-big", edited(serving, spec__frontend__port=70000), "spec.frontend.port"),
        Invalid(
            "serving-grpc-port-is-http-port", edited(serving, spec__frontend__grpcPort=8000), "spec.frontend.grpcPort"
        ),
        Invalid(
            "serving-move-fraction-zero", edited(serving, spec__eplb__maxMovesFraction=0), "spec.eplb.maxMovesFraction"
        ),
        Invalid("placement-negative-id", edited(xp, spec__layers__0__slots__0=[0, -1, 2]), "spec.layers[0].slots"),
        # Enums.
        Invalid("training-unknown-preset", edited(training, spec__model__preset="gpt-5"), "spec.model.preset"),
        Invalid("training-bad-dtype", edited(training, spec__model__dtype="int4"), "spec.model.dtype"),
        Invalid(
            "serving-bad-toleration",
            edited(serving, spec__scheduling={"tolerations": [{"key": "gpu", "operator": "Maybe"}]}),
            "spec.scheduling.tolerations[0].operator",
        ),
        # Unknown fields (kubectl's strict field validation).
        Invalid("training-typo-field", edited(training, spec__numNode=2), "spec.numNode"),
        # Cross-field rules (CEL).
        Invalid(
            "training-preset-and-config",
            edited(training, spec__model__config=dict(INLINE_CONFIG)),
            "spec.model",
        ),
        Invalid(
            "serving-topk-over-experts",
            edited(inline, spec__model__config__num_experts_per_tok=9),
            "spec.model.config.num_experts_per_tok",
        ),
        Invalid(
            "serving-too-many-redundant-slots",
            edited(inline, spec__redundantSlotsPerRank=5),
            "spec.redundantSlotsPerRank",
        ),
        Invalid(
            "training-data-parallel-mismatch",
            edited(training, spec__parallelism__dataParallel=3),
            "spec.parallelism.dataParallel",
        ),
        Invalid(
            "training-expert-parallel-not-dividing",
            edited(training, spec__parallelism__expertParallel=3),
            "spec.parallelism.expertParallel",
        ),
        Invalid(
            "training-schedule-longer-than-steps",
            edited(training, spec__steps=5),
            "spec.optimizer",
        ),
        Invalid(
            "training-two-checkpoint-targets",
            edited(training, spec__checkpointing__uri="file:///ckpt", spec__checkpointing__claimName="ckpt"),
            "spec.checkpointing",
        ),
        Invalid("training-corpus-and-uri", edited(training, spec__data__uri="file:///data"), "spec.data"),
        Invalid(
            "training-no-preemption-grace",
            edited(training, spec__checkpointing__preemptionGraceSeconds=0),
            "spec.checkpointing.preemptionGraceSeconds",
        ),
        Invalid("serving-name-too-long", edited(serving, metadata__name="k2-" + "x" * 45), "metadata.name"),
        Invalid("placement-slots-cannot-hold-experts", edited(xp, spec__numExperts=7), "spec.slotsPerRank"),
        Invalid(
            "placement-wrong-shape",
            edited(xp, spec__layers__1__slots=[[0, 1, 2], [3, 0]]),
            "spec.layers[*].slots must have spec.ranks rows",
        ),
        Invalid(
            "placement-id-out-of-range",
            edited(xp, spec__layers__1__slots=[[0, 1, 2], [3, 0, 4]]),
            "every expert id must be in [0, spec.numExperts)",
        ),
        Invalid("placement-missing-layer", edited(xp, spec__numLayers=3), "spec.layers"),
        Invalid(
            "placement-layer-out-of-range",
            edited(xp, spec__layers__1__layer=5),
            "spec.layers[*].layer must be < spec.numLayers",
        ),
    ]
