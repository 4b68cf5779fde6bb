"""Weight inheritance: a child's adapter starts as its parent's update (exact, or the best
lower-rank approximation), modules the parent lacks start fresh, and a run records what it took."""
import copy

import numpy as np
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from evolm.jsonfiles import read_jsonl
from evolm.config import BuildConfig
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor
from evolm.genome import lora_config
from evolm.inherit import inherit_adapter, resize_pair
from evolm.lineage import ancestry
from evolm.models import build_model
from evolm.train import adapter_on, evaluate_genome, fine_tune
from tests.conftest import tiny_experiment

RNG = np.random.default_rng(0)


def factors(r, n_in=12, n_out=10):
    return RNG.normal(size=(r, n_in)).astype(np.float32), RNG.normal(size=(n_out, r)).astype(np.float32)


def test_same_rank_keeps_the_update_under_another_alpha():
    a, b = factors(4)
    fresh_a, fresh_b = factors(4)
    new_a, new_b = resize_pair(a, b, 2.0, 0.5, fresh_a, np.zeros_like(fresh_b))
    np.testing.assert_allclose(0.5 * new_b @ new_a, 2.0 * b @ a, rtol=1e-5)


def test_smaller_rank_is_the_truncated_svd():
    a, b = factors(6)
    fresh_a, _ = factors(2)
    new_a, new_b = resize_pair(a, b, 1.5, 3.0, fresh_a, np.zeros((10, 2), np.float32))
    u, s, vt = np.linalg.svd(1.5 * b.astype(np.float64) @ a, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(3.0 * new_b @ new_a, best, rtol=1e-4, atol=1e-4)


def test_larger_rank_is_exact_and_the_rest_starts_fresh():
    a, b = factors(2)
    fresh_a, _ = factors(8)
    new_a, new_b = resize_pair(a, b, 4.0, 1.0, fresh_a, np.zeros((10, 8), np.float32))
    np.testing.assert_allclose(new_b @ new_a, 4.0 * b @ a, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(new_a[2:], fresh_a[2:])  # fresh rows of A, zero columns of B: no effect yet
    assert not new_b[:, 2:].any()


HP = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"], "learning_rate": 5e-3,
      "max_steps": 6, "per_device_train_batch_size": 4, "layers_to_transform": [0]}


@pytest.fixture(scope="module")
def base():
    return build_model(BuildConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=300), 300, 16, seed=0)


def test_child_model_starts_from_the_parent_update(base):
    data = np.random.default_rng(1).integers(0, 300, size=(24, 16)).astype(np.int32)
    parent = evaluate_genome(base, {"train": data, "validation": data[:8]}, HP, 3,
                             {"eval_batch_size": 8, "eval_max_batches": 1}, torch.device("cpu"))["adapter"]
    child_hp = HP | {"r": 2, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj"], "layers_to_transform": [0, 1]}
    model = get_peft_model(copy.deepcopy(base), lora_config(child_hp))
    taken = inherit_adapter(model, parent, HP, child_hp)
    # layer 0's c_attn is shared; every c_proj (attention and MLP, both layers) and layer 1's c_attn start fresh
    assert taken == {"modules_shared": 1, "modules_fresh": 5, "rank": [4, 2], "resized": True}
    child = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    shared = "base_model.model.transformer.h.0.attn.c_attn."
    a, b = parent[shared + "lora_A.weight"], parent[shared + "lora_B.weight"]
    u, s, vt = np.linalg.svd((8 / 4) * b.astype(np.float64) @ a, full_matrices=False)
    np.testing.assert_allclose((16 / 2) * child[shared + "lora_B.weight"] @ child[shared + "lora_A.weight"],
                               (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-5)
    fresh = [k for k in child if k.endswith("lora_B.weight") and not k.startswith(shared)]
    assert len(fresh) == 5 and not any(child[k].any() for k in fresh)


def test_inheriting_changes_where_training_starts(base):
    data = np.random.default_rng(2).integers(0, 300, size=(24, 16)).astype(np.int32)
    cpu = torch.device("cpu")
    with adapter_on(base, HP, 1, cpu) as parent:
        fine_tune(parent, data, HP, 1, cpu)
        arrays = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(parent).items()}
    with adapter_on(base, HP, 2, cpu) as model:
        fresh = fine_tune(model, data, HP, 2, cpu)
    with adapter_on(base, HP, 2, cpu) as model:
        inherited = fine_tune(model, data, HP, 2, cpu, inherit={"adapter": arrays, "hp": HP, "from": "p"})
    assert inherited["inherited"]["from"] == "p" and inherited["inherited"]["modules_shared"] == 1
    assert inherited["first"] < fresh["first"]  # the first batch already sees the parent's learning


def test_run_records_inheritance(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["stages"] = raw["stages"][:1]
    raw["search"].update({"population_size": 4, "offspring_size": 4, "generations": 2, "inherit_weights": True})
    run_dir = tmp_path / "run"
    ContinualRun(parse_config(raw), run_dir, lambda: LocalExecutor(threads=1)).run()
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    trained_before = {}
    for r in evals:
        if r["status"] == "ok":
            trained_before.setdefault(r["genome_id"], r)
    children = [r for r in evals if r["generation"] > 0 and not r["cached"]]
    # immigrants too: random genes, the best genome's adapter to start from
    assert [r for r in children if r["ops"] == ["random"]] and [r for r in children if r["ops"] != ["random"]]
    for r in children:
        took = r["inherited"]
        assert took is not None and took["from"] in r["parents"]
        parent = trained_before[took["from"]]
        assert parent["generation"] < r["generation"] and took["adapter_of"] == parent["result_of"]
        assert took["rank"] == [parent["values"]["r"], r["values"]["r"]]
        assert r["steps"] == r["values"]["max_steps"]  # only its own steps count
    assert all(r["inherited"] is None for r in evals if r["generation"] == 0)
    graph = ancestry(evals, children[-1]["genome_id"])
    assert graph["nodes"][children[-1]["genome_id"]]["inherited_from"] == children[-1]["inherited"]["from"]


def test_parent_choice_without_the_first_objective_measured(tmp_path):
    """Stage 1 without pretraining has no retention blocks: a retention_loss-first run still picks a
    parent (by 0.0, then id) instead of failing on the missing objective."""
    from evolm.config import HalvingConfig
    from evolm.evaluation import GenerationEvaluator
    from evolm.genome import Genome
    from evolm.ledger import StageLedger
    from evolm.records import EvaluationRecord

    ledger = StageLedger(tmp_path, 1)
    for gid in ("aa", "bb"):
        ledger.records[(0, gid)] = EvaluationRecord(genome_id=gid, result_of=gid, status="ok", cached=False,
                                                    values={"r": 4, "lora_alpha": 8}, objectives={"val_loss": 3.0})
        ledger.save_adapter(gid, {"w": np.zeros((2, 2), np.float32)})
    evaluator = GenerationEvaluator(tmp_path, 1, "code", ledger, None, None, ["retention_loss", "val_loss"],
                                    {"r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "max_steps": 4,
                                     "per_device_train_batch_size": 2}, 0, HalvingConfig(), True)
    child = Genome(values={"r": 2}, id="cc", parents=["bb", "aa"], born=(1, 1))
    taken = evaluator._inheritance(1, child)
    assert taken["from"] == "aa" and taken["hp"].r == 4 and set(taken["adapter"]) == {"w"}
    assert evaluator._inheritance(1, Genome(values={}, id="dd", parents=["aa"], born=(1, 0))) is None  # not a newborn
