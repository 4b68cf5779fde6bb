"""Merge strategies on dense LoRA deltas: hand-checked element logic, then real adapters of different
ranks and layer masks on tiny GPT-2 (Conv1D, transposed) and Llama models, against independent
numpy arithmetic and against PEFT's own merge."""
import numpy as np
import pytest
import torch

from evolm.config import BuildConfig
from evolm.genome import hyperparameters
from evolm.merge import (apply_deltas, attach_adapter, dare, lora_deltas, merge_best, merge_winners,
                         task_arithmetic, ties)
from evolm.models import build_model
from evolm.train import evaluate_genome
from tests.test_train_merge import blocks, training_for


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----- element logic on tensors you can check by hand ----------------------------------------
def test_task_arithmetic_is_the_weighted_sum_and_missing_keys_are_zero():
    a = {"w": t([[1, -2], [3, 0]]), "only_a": t([1, 1])}
    b = {"w": t([[2, 2], [-1, 4]])}
    merged = task_arithmetic([a, b], [0.5, 2.0])
    assert torch.equal(merged["w"], t([[4.5, 3], [-0.5, 8]]))
    assert torch.equal(merged["only_a"], t([0.5, 0.5]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    a = {"w": t([[3, -1], [0.5, 2]])}
    b = {"w": t([[-2, -4], [1, 1]])}
    # density 0.5 keeps 2 of 4 entries: a -> [3, 0, 0, 2], b -> [-2, -4, 0, 0]
    # equal weights: sums [1, -4, 0, 2] elect [+, -, +, +]; agreeing non-zero entries: a, b, none, a
    assert torch.equal(ties([a, b], [1.0, 1.0], density=0.5)["w"], t([[3, -4], [0, 2]]))
    # weight 3 on b: the first entry's sum 3 - 6 < 0 elects -, so only b's -2 counts: (3 * -2) / 3
    assert torch.equal(ties([a, b], [1.0, 3.0], density=0.5)["w"], t([[-2, -4], [0, 2]]))
    # no trimming and agreeing signs: the weighted mean
    c, d = {"w": t([1, 4])}, {"w": t([3, 2])}
    assert torch.allclose(ties([c, d], [1.0, 3.0], density=1.0)["w"], t([2.5, 2.5]))


def test_ties_of_a_single_delta_at_full_density_is_the_delta():
    delta = {"w": torch.randn(5, 7, generator=torch.Generator().manual_seed(0))}
    assert torch.allclose(ties([delta], [0.3], density=1.0)["w"], delta["w"])


def test_dare_drops_with_the_seeded_generator_and_rescales():
    a = {"x": t([[1, 2, 3], [4, 5, 6]]), "y": t([7, 8])}
    b = {"x": t([[-1, -1, -1], [-1, -1, -1]])}
    g = torch.Generator().manual_seed(11)  # the documented order: adapter by adapter, keys sorted
    ka_x, ka_y, kb_x = (torch.rand(s, generator=g) < 0.5 for s in [(2, 3), (2,), (2, 3)])
    expected_x = 0.3 * a["x"] * ka_x / 0.5 + 0.7 * b["x"] * kb_x / 0.5
    merged = dare([a, b], [0.3, 0.7], density=0.5, seed=11)
    assert torch.allclose(merged["x"], expected_x) and torch.allclose(merged["y"], 0.3 * a["y"] * ka_y / 0.5)
    assert torch.equal(dare([a, b], [0.3, 0.7], 0.5, seed=11)["x"], merged["x"])  # reproducible
    assert torch.allclose(dare([a, b], [0.3, 0.7], density=1.0, seed=5)["x"], task_arithmetic([a, b], [0.3, 0.7])["x"])


def test_dare_keeps_about_density_of_the_entries_scaled_up():
    delta = {"w": torch.ones(200, 100)}
    merged = dare([delta], [1.0], density=0.3, seed=0)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(merged[kept], torch.full((int(kept.sum()),), 1 / 0.3))


def test_dare_ties_is_the_ties_election_on_the_dropped_deltas():
    a, b = {"w": t([2, -2, 1, 4])}, {"w": t([-1, -1, 3, 1])}
    g = torch.Generator().manual_seed(3)
    ka, kb = torch.rand(4, generator=g) < 0.6, torch.rand(4, generator=g) < 0.6
    da, db = a["w"] * ka / 0.6, b["w"] * kb / 0.6
    expected = numpy_disjoint_mean(np.stack([da.numpy(), db.numpy()]), np.array([1.0, 2.0]))
    merged = dare([a, b], [1.0, 2.0], density=0.6, seed=3, use_ties=True)["w"]
    assert np.allclose(merged.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(density=0.0), dict(density=1.5), dict(weights=[1.0]), dict(weights=[1.0, -1.0])])
def test_bad_merge_arguments_are_refused(bad):
    args = {"density": 0.5, "weights": [1.0, 1.0], **bad}
    with pytest.raises(ValueError):
        ties([{"w": t([1])}, {"w": t([2])}], args["weights"], args["density"])


# ----- independent reference arithmetic (numpy) -----------------------------------------------
def numpy_trim(x: np.ndarray, density: float) -> np.ndarray:
    k = int(density * x.size)
    flat = x.reshape(-1)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


def numpy_disjoint_mean(stacked: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.zeros(stacked.shape[1:])
    for idx in np.ndindex(*stacked.shape[1:]):
        vals = stacked[(slice(None),) + idx]
        sign = 1.0 if (w * vals).sum() >= 0 else -1.0
        agree = (vals != 0) & (np.sign(vals) == sign)
        out[idx] = (w * vals)[agree].sum() / w[agree].sum() if agree.any() else 0.0
    return out


def reference_merge(deltas_list, weights, strategy, density):
    names = sorted({n for d in deltas_list for n in d})
    w = np.asarray(weights, dtype=np.float64)
    merged = {}
    for name in names:
        shape = next(d[name].shape for d in deltas_list if name in d)
        stacked = np.stack([d[name] if name in d else np.zeros(shape) for d in deltas_list]).astype(np.float64)
        if strategy == "task_arithmetic":
            merged[name] = np.tensordot(w, stacked, axes=1)
        else:
            merged[name] = numpy_disjoint_mean(np.stack([numpy_trim(s, density) for s in stacked]), w)
    return merged


# ----- real adapters --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request):
    """A tiny base and two trained adapters: rank 2 on block 0, rank 4 on both blocks (other targets)."""
    family = request.param
    base = build_model(BuildConfig(family=family, n_layer=2, n_embd=32, n_head=2, vocab_size=400), 400, 32,
                       seed=0).eval()
    targets = {"gpt2": (["c_attn", "c_proj"], ["c_attn", "c_fc"]),
               "llama": (["q_proj", "v_proj"], ["q_proj", "down_proj"])}[family]
    winners = []
    for i, (r, mask, modules) in enumerate([(2, [True, False], targets[0]), (4, [True, True], targets[1])]):
        hp = hyperparameters({"layers": mask}, training_for(family, r=r, lora_alpha=2 * r + 1,
                                                            target_modules=modules))
        result = evaluate_genome(base, {"train": blocks(seed=i), "validation": blocks(8, 9)}, hp, seed=i,
                                 training=training_for(family), device=torch.device("cpu"))
        winners.append((hp, result["adapter"]))
    return family, base, winners


def peft_deltas(base, hp, adapter) -> dict[str, np.ndarray]:
    """ΔW per base weight from PEFT's own get_delta_weight (already in the base weight's layout)."""
    from peft.tuners.lora import LoraLayer

    model = attach_adapter(base, hp, adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name + ".weight"] = module.get_delta_weight("default").detach().numpy()
    return out


def test_lora_deltas_match_peft_and_cover_the_adapted_modules(trained):
    family, base, winners = trained
    for hp, adapter in winners:
        ours = lora_deltas(base, hp, adapter)
        theirs = peft_deltas(base, hp, adapter)
        assert sorted(ours) == sorted(theirs) and len(ours) == len(adapter) // 2
        for name, delta in ours.items():
            assert delta.shape == dict(base.named_parameters())[name].shape
            assert np.allclose(delta.numpy(), theirs[name], rtol=0, atol=1e-7)
    if family == "gpt2":  # Conv1D: (in, out), here c_attn is (32, 96)
        assert lora_deltas(base, *winners[0])["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


def test_applied_deltas_equal_peft_merge_and_unload(trained):
    _, base, winners = trained
    hp, adapter = winners[1]
    ours = apply_deltas(base, lora_deltas(base, hp, adapter)).state_dict()
    peft_merged = merge_best(base, hp, adapter).state_dict()
    assert sorted(ours) == sorted(peft_merged)
    assert max((ours[k] - peft_merged[k]).abs().max().item() for k in ours) < 1e-5
    x = torch.from_numpy(blocks(2, 5).astype(np.int64))
    with torch.no_grad():
        assert (apply_deltas(base, lora_deltas(base, hp, adapter))(x).logits - merge_best(base, hp, adapter)(x).logits
                ).abs().max() < 1e-4


@pytest.mark.parametrize("strategy", ["task_arithmetic", "ties"])
def test_merged_weights_are_base_plus_the_strategy(trained, strategy):
    _, base, winners = trained
    weights = [0.7, 0.4]
    merged = merge_winners(base, winners, strategy, weights=weights, density=0.4).state_dict()
    # lora_deltas is checked against PEFT above; the combination here is numpy's, independent of merge.py
    expected = reference_merge([{k: v.numpy() for k, v in lora_deltas(base, hp, a).items()} for hp, a in winners],
                               weights, strategy, 0.4)
    before = base.state_dict()
    assert set(expected) == {n for hp, a in winners for n in lora_deltas(base, hp, a)}
    for name, value in merged.items():
        want = before[name].double().numpy() + expected.get(name, 0.0)
        assert np.allclose(value.double().numpy(), want, rtol=0, atol=1e-6), name
        if name not in expected:
            assert torch.equal(value, before[name])


@pytest.mark.parametrize("strategy", ["dare", "dare_ties"])
def test_dare_merges_are_base_plus_the_dropped_combination(trained, strategy):
    _, base, winners = trained
    deltas = [lora_deltas(base, hp, a) for hp, a in winners]
    g = torch.Generator().manual_seed(4)
    dropped = [{n: (d[n] * (torch.rand(d[n].shape, generator=g) < 0.6) / 0.6).numpy() for n in sorted(d)}
               for d in deltas]
    expected = reference_merge(dropped, [0.5, 0.5], "task_arithmetic" if strategy == "dare" else "ties", 1.0)
    merged = merge_winners(base, winners, strategy, density=0.6, seed=4).state_dict()  # default weights 1/2
    before = base.state_dict()
    for name, want in expected.items():
        assert np.allclose(merged[name].double().numpy(), before[name].double().numpy() + want, rtol=0, atol=1e-6)
    assert not torch.equal(merged[next(iter(expected))], before[next(iter(expected))])


def test_best_uses_the_first_winner_alone(trained):
    _, base, winners = trained
    best = merge_winners(base, winners, "best").state_dict()
    alone = merge_best(base, *winners[0]).state_dict()
    assert all(torch.equal(best[k], alone[k]) for k in best)
    with pytest.raises(ValueError, match="unknown"):
        merge_winners(base, winners, "slerp")


def test_trimming_through_peft_keeps_the_same_entries_as_a_stable_sort():
    """magnitude_trim delegates to PEFT; on deltas without ties it keeps exactly the top-k by magnitude."""
    from evolm.merge import magnitude_trim

    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    for density in (0.1, 0.5, 0.9):
        k = int(density * delta.numel())
        order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
        expected = torch.zeros(delta.numel())
        expected[order[:k]] = delta.reshape(-1)[order[:k]]
        assert torch.equal(magnitude_trim(delta, density), expected.reshape(delta.shape))
