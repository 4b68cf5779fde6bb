import random

import pytest
from pydantic import TypeAdapter

from evolm.space import Gene

SPECS = [
    {"type": "categorical", "choices": [2, 4, 8, 16]},
    {"type": "categorical", "choices": [["c_attn"], ["c_attn", "c_proj"]]},
    {"type": "categorical", "choices": ["only"]},
    {"type": "int", "low": 1, "high": 3},
    {"type": "int", "low": 5, "high": 5},
    {"type": "int", "low": 10, "high": 1000, "log": True},
    {"type": "uniform", "low": 0.0, "high": 0.2},
    {"type": "log_uniform", "low": 1e-5, "high": 1e-2},
    {"type": "bool"},
    {"type": "layer_mask", "n_layers": 1},
    {"type": "layer_mask", "n_layers": 6, "p_on": 0.1},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"] + str(s.get("n_layers", s.get("high", ""))))
def test_operators_stay_in_range(spec):
    gene = TypeAdapter(Gene).validate_python(spec)
    rng = random.Random(0)
    values = [gene.sample(rng) for _ in range(300)]
    assert all(gene.contains(v) for v in values)
    for a, b in zip(values, reversed(values)):
        mutated, described = gene.mutate(a, rng)
        assert gene.contains(mutated), (a, mutated)
        assert isinstance(described, str) and described
        for child in gene.cross(a, b, rng):
            assert gene.contains(child), (a, b, child)


def test_mutation_moves_when_it_can():
    gene = TypeAdapter(Gene).validate_python({"type": "int", "low": 0, "high": 1})
    rng = random.Random(1)
    assert all(gene.mutate(v, rng)[0] != v for v in [0, 1] * 50)
    cat = TypeAdapter(Gene).validate_python({"type": "categorical", "choices": ["a", "b", "c"]})
    assert all(cat.mutate("a", rng)[0] != "a" for _ in range(50))


def test_layer_mask_is_never_empty():
    gene = TypeAdapter(Gene).validate_python({"type": "layer_mask", "n_layers": 3, "p_on": 0.01})
    rng = random.Random(2)
    mask = [False, False, True]
    for _ in range(500):
        mask, _ = gene.mutate(mask, rng)
        assert any(mask) and len(mask) == 3


def test_contains_rejects_out_of_range_values():
    gene = TypeAdapter(Gene).validate_python({"type": "log_uniform", "low": 1e-4, "high": 1e-2})
    assert not gene.contains(0.5) and not gene.contains(True) and gene.contains(1e-3)
