"""The pure placement validator: properties over random placements (hypothesis)."""

from __future__ import annotations

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_api.placement import (
    ExpertPlacementSpec,
    LayerPlacement,
    missing_experts,
    placement_problems,
    round_robin,
    shape_problems,
)


@st.composite
def dimensions(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(numLayers, numExperts, ranks, slotsPerRank) with enough slots for every expert."""
    num_layers = draw(st.integers(1, 4))
    ranks = draw(st.integers(1, 8))
    slots_per_rank = draw(st.integers(1, 8))
    num_experts = draw(st.integers(1, ranks * slots_per_rank))
    return num_layers, num_experts, ranks, slots_per_rank


@st.composite
def random_placements(draw: st.DrawFn) -> ExpertPlacementSpec:
    """Right shape and id range, arbitrary contents: some experts may have no replica."""
    num_layers, num_experts, ranks, slots_per_rank = draw(dimensions())
    ids = st.integers(0, num_experts - 1)
    layers = [
        LayerPlacement(
            layer=i,
            slots=draw(
                st.lists(
                    st.lists(ids, min_size=slots_per_rank, max_size=slots_per_rank), min_size=ranks, max_size=ranks
                )
            ),
        )
        for i in range(num_layers)
    ]
    return ExpertPlacementSpec(
        num_layers=num_layers, num_experts=num_experts, ranks=ranks, slots_per_rank=slots_per_rank, layers=layers
    )


@settings(max_examples=200, deadline=None)
@given(dimensions())
def test_round_robin_is_always_valid(dims: tuple[int, int, int, int]) -> None:
    num_layers, num_experts, ranks, slots_per_rank = dims
    spec = ExpertPlacementSpec(
        num_layers=num_layers,
        num_experts=num_experts,
        ranks=ranks,
        slots_per_rank=slots_per_rank,
        layers=round_robin(*dims),
    )
    assert placement_problems(spec) == []


@settings(max_examples=300, deadline=None)
@given(random_placements())
def test_missing_experts_is_exactly_the_uncovered_set(spec: ExpertPlacementSpec) -> None:
    missing = missing_experts(spec)
    for entry in spec.layers:
        counts = [0] * spec.num_experts
        for row in entry.slots:
            for expert in row:
                counts[expert] += 1
        expected = [e for e, c in enumerate(counts) if c == 0]
        assert missing.get(entry.layer, []) == expected
    # Valid exactly when nothing is missing; every problem then names the layer and the field.
    problems = placement_problems(spec)
    assert (problems == []) == (missing == {})
    assert all(
        p.startswith(f"spec.layers[layer={layer}].slots") for layer, p in zip(sorted(missing), problems, strict=True)
    )


@settings(max_examples=200, deadline=None)
@given(random_placements(), st.data())
def test_removing_every_replica_of_an_expert_is_reported(spec: ExpertPlacementSpec, data: st.DataObject) -> None:
    layer = data.draw(st.sampled_from(spec.layers))
    victim = data.draw(st.integers(0, spec.num_experts - 1))
    if spec.num_experts == 1:
        return  # nothing to replace it with
    other = (victim + 1) % spec.num_experts
    layer.slots = [[other if e == victim else e for e in row] for row in layer.slots]
    assert victim in missing_experts(spec)[layer.layer]
    assert any(f"layer={layer.layer}" in p for p in placement_problems(spec))


def test_shape_and_range_errors_are_rejected_when_parsing() -> None:
    good = round_robin(1, 4, 2, 2)
    with pytest.raises(pydantic.ValidationError, match=r"spec\.ranks rows"):
        ExpertPlacementSpec(
            num_layers=1,
            num_experts=4,
            ranks=2,
            slots_per_rank=2,
            layers=[LayerPlacement(layer=0, slots=[[0, 1], [2]])],
        )
    with pytest.raises(pydantic.ValidationError, match=r"\[0, spec.numExperts\)"):
        ExpertPlacementSpec(num_layers=1, num_experts=3, ranks=2, slots_per_rank=2, layers=good)
    with pytest.raises(pydantic.ValidationError, match="cannot hold"):
        ExpertPlacementSpec(num_layers=1, num_experts=5, ranks=2, slots_per_rank=2, layers=good)
    with pytest.raises(pydantic.ValidationError, match="unique"):
        ExpertPlacementSpec(num_layers=2, num_experts=4, ranks=2, slots_per_rank=2, layers=good + good)


def test_round_robin_refuses_too_few_slots() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        round_robin(1, 5, 2, 2)


def test_shape_problems_ignore_coverage() -> None:
    layers = [LayerPlacement(layer=0, slots=[[0, 0], [0, 0]])]
    spec = ExpertPlacementSpec(num_layers=1, num_experts=4, ranks=2, slots_per_rank=2, layers=layers)
    assert shape_problems(spec) == []
    assert missing_experts(spec) == {0: [1, 2, 3]}
    assert placement_problems(spec) == ["spec.layers[layer=0].slots: experts without a replica: 1, 2, 3"]
