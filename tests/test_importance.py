"""Gene importance on synthetic searches where the answer is known."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evolm.importance import explained_share, gene_importance, gene_kind, group_labels, stage_importances

SPACE = {"learning_rate": {"type": "log_uniform"}, "r": {"type": "categorical"}, "dropout": {"type": "uniform"},
         "layers": {"type": "layer_mask"}, "use_bias": {"type": "bool"}}


def genomes(n, seed=0):
    rng = random.Random(seed)
    return [{"learning_rate": 10 ** rng.uniform(-4, -2), "r": rng.choice([2, 4, 8, 16]),
             "dropout": rng.uniform(0, 0.2), "layers": [rng.random() < 0.5 for _ in range(4)],
             "use_bias": rng.random() < 0.5} for _ in range(n)]


@pytest.mark.parametrize("decisive", ["learning_rate", "r", "use_bias", "layers"])
def test_the_gene_that_decides_fitness_gets_the_top_share(decisive):
    rows, rng = genomes(60), random.Random(1)
    effect = {"learning_rate": lambda v: abs(v["learning_rate"] - 1e-3) * 1000,
              "r": lambda v: {2: 3.0, 4: 1.0, 8: 0.0, 16: 2.0}[v["r"]],
              "use_bias": lambda v: 2.0 * v["use_bias"],
              "layers": lambda v: 2.0 * v["layers"][0] + 1.0 * v["layers"][3]}[decisive]
    fitness = [3.0 + effect(v) + rng.gauss(0, 0.05) for v in rows]
    shares = gene_importance(rows, fitness, SPACE)
    assert next(iter(shares)) == decisive and shares[decisive] > 0.6
    assert sum(shares.values()) == pytest.approx(1.0)


def test_noise_alone_explains_little_and_many_rare_values_do_not_win():
    rows, rng = genomes(40, seed=3), random.Random(4)
    for i, v in enumerate(rows):
        v["genome_tag"] = i  # a unique value per genome: a group each, no evidence at all
    fitness = [rng.gauss(3, 0.1) for _ in rows]
    assert explained_share([str(v["genome_tag"]) for v in rows], fitness) == 0.0
    shares = gene_importance(rows, fitness, SPACE)
    assert shares["genome_tag"] == 0.0


def test_constant_fitness_gives_all_zeros():
    rows = genomes(10)
    assert set(gene_importance(rows, [2.0] * 10, SPACE).values()) == {0.0}


def test_numeric_genes_are_binned_by_quantiles():
    labels = group_labels([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "numeric", bins=4)
    assert labels == ["bin0", "bin0", "bin1", "bin1", "bin2", "bin2", "bin3", "bin3"]
    assert group_labels([[True, False], [True, False], 4], "categorical") == ["[true, false]"] * 2 + ["4"]
    assert gene_kind({"type": "int"}, [1]) == "numeric" and gene_kind({"type": "bool"}, [True]) == "categorical"
    assert gene_kind(None, [0.1, 0.2, 0.3, 0.4, 0.5]) == "numeric" and gene_kind(None, ["a", "b"]) == "categorical"
    assert gene_kind({"type": "layer_mask"}, [[True, False]]) == gene_kind(None, [[True], [False, True]]) == "mask"
    assert group_labels([[True, False], [True, False]], "mask") == ["[true, false]"] * 2  # grouped by pattern


def test_stage_importances_use_ok_uncached_evaluations_only():
    rows = genomes(12)
    evals = [{"stage": 1, "status": "ok", "cached": False, "values": v, "objectives": {"val_loss": 3 + v["use_bias"]},
              "genome_id": f"g{i}"} for i, v in enumerate(rows)]
    evals += [{"stage": 1, "status": "failed", "cached": False, "values": rows[0], "objectives": None},
              {"stage": 1, "status": "ok", "cached": True, "values": rows[0], "objectives": {"val_loss": 99.0}},
              {"stage": 1, "status": "ok", "cached": False, "values": rows[0], "objectives": {"val_loss": 99.0},
               "genome_id": "g0"},  # the same result logged twice: counted once
              {"stage": 2, "status": "ok", "cached": False, "values": rows[1], "objectives": {"val_loss": 1.0}}]
    result = stage_importances(evals, SPACE)
    assert list(result) == [1]  # stage 2 has too few evaluations to say anything
    assert next(iter(result[1])) == "use_bias"


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 genomes but 1 fitness"):
        gene_importance(genomes(2), [1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=2, max_size=30),
       st.integers(min_value=0, max_value=100))
def test_shares_are_a_distribution_or_all_zero(fitness, seed):
    shares = gene_importance(genomes(len(fitness), seed), fitness, SPACE)
    assert all(0.0 <= s <= 1.0 for s in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0) or sum(shares.values()) == 0.0


def test_fresh_and_inherited_evaluations_are_told_apart():
    """Fresh evaluations where use_bias decides the loss, inherited ones where r does: each subset
    names its own gene, and all together see both."""
    rows = genomes(24, seed=3)
    evals = []
    for i, v in enumerate(rows):
        inherited = i % 2 == 1
        loss = 3 + (v["r"] / 16 if inherited else v["use_bias"])
        evals.append({"stage": 1, "status": "ok", "cached": False, "values": v, "objectives": {"val_loss": loss},
                      "genome_id": f"g{i}", "inherited": {"from": "p"} if inherited else None})
    fresh = stage_importances(evals, SPACE, "fresh")[1]
    inherited = stage_importances(evals, SPACE, "inherited")[1]
    assert next(iter(fresh)) == "use_bias" and next(iter(inherited)) == "r"
    with pytest.raises(ValueError, match="start must be one of"):
        stage_importances(evals, SPACE, "both")
