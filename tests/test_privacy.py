"""Differentially private adapter training (``training.privacy``): each sample's gradient is really
clipped, noise of the right scale is really added, ε is the RDP accountant's, a private evaluation is
deterministic and resumes exactly, ε is recorded and searchable, and bad input is refused in one line."""
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from evolm.config import BuildConfig
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.errors import ConfigError
from evolm.executor import EvalRequest, LocalExecutor, StagePayload
from evolm.jsonfiles import read_jsonl
from evolm.models import ModelPayload, build_model
from evolm.privacy import PrivacySettings, PrivateTraining, clip_per_sample, epsilon, per_sample_losses, sample_rate
from evolm.train import adapter_on, evaluate_genome, fine_tune
from tests.conftest import tiny_experiment, write_experiment
from tests.test_cli import evolm

VOCAB, BLOCK = 300, 16
PRIVACY = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "delta": 1e-5}
HP = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True,
      "learning_rate": 5e-3, "max_steps": 6, "per_device_train_batch_size": 4, "privacy": PRIVACY}
TRAINING = {"eval_batch_size": 8, "eval_max_batches": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base():
    return build_model(BuildConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB), VOCAB, BLOCK, seed=0)


@pytest.fixture(scope="module")
def blocks():
    rng = np.random.default_rng(0)
    return {"train": rng.integers(VOCAB, size=(40, BLOCK)), "validation": rng.integers(VOCAB, size=(16, BLOCK))}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def one_by_one_gradients(model, batch: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each sample's gradient by its own backward pass (micro-batches of one): the reference."""
    grads = []
    for row in batch:
        x = row[None]
        per_sample_losses(model, {"input_ids": x, "labels": x}).sum().backward()
        grads.append([p.grad.clone() for p in trainable(model)])
        model.zero_grad(set_to_none=True)
    return grads


def test_every_sample_gradient_is_clipped_before_the_sum(base, blocks):
    batch = torch.from_numpy(blocks["train"][:6])
    with adapter_on(base, HP, 0, CPU) as model:
        model.train()
        reference = one_by_one_gradients(model, batch)
        norms = torch.stack([torch.cat([g.flatten() for g in sample]).norm() for sample in reference])
        clip = float(norms.median())  # some samples above the clip, some below
        assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()

        stacked = [torch.stack([sample[i] for sample in reference]) for i in range(len(reference[0]))]
        clipped, before = clip_per_sample(stacked, clip)
        after = torch.cat([g.reshape(len(g), -1) for g in clipped], dim=1).norm(dim=1)  # per sample, all parameters
        torch.testing.assert_close(before, norms)
        assert (after <= clip * (1 + 1e-5)).all()
        small = norms <= clip
        torch.testing.assert_close(after[small], norms[small])  # below the clip: untouched

        # Opacus's per-sample gradients in one pass equal the one-by-one ones, clipped, before the sum
        private = PrivateTraining(model, PrivacySettings(0.0, clip, 1e-5), 0.1, seed=0)
        private.backward(model, batch.numpy(), CPU, parts=2)  # two micro-batches: still per sample
        torch.testing.assert_close(private.sample_norms, norms[3:], rtol=1e-4, atol=1e-6)
        for p, g in zip(trainable(model), clipped):
            torch.testing.assert_close(p.grad, g.mean(dim=0), rtol=1e-4, atol=1e-7)
        private.finish(1)


def test_noise_has_the_scale_of_noise_multiplier_times_clip_over_batch(base, blocks):
    batch = torch.from_numpy(blocks["train"][:8])
    sigma, clip = 2.0, 0.5
    with adapter_on(base, HP, 0, CPU) as model:
        model.train()

        def gradient(noise: float, seed: int) -> torch.Tensor:
            private = PrivateTraining(model, PrivacySettings(noise, clip, 1e-5), 0.1, seed)
            private.backward(model, batch.numpy(), CPU, parts=1)
            private.finish(1)
            return torch.cat([p.grad.flatten() for p in trainable(model)])

        clean = gradient(0.0, seed=1)
        noise = (gradient(sigma, seed=1) - clean) * len(batch) / (sigma * clip)
        assert noise.numel() > 2000
        assert abs(float(noise.std()) - 1.0) < 0.08 and abs(float(noise.mean())) < 0.08
        torch.testing.assert_close(gradient(sigma, seed=1), gradient(sigma, seed=1))  # seeded
        assert not torch.equal(gradient(sigma, seed=1), gradient(sigma, seed=2))


def accountant_epsilon(steps_of: list[tuple[float, float, int]], delta: float) -> float:
    """ε as Opacus's accountant reaches it, one optimizer step after another."""
    accountant = RDPAccountant()
    for sigma, rate, steps in steps_of:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta)


def test_epsilon_is_the_accountants_and_moves_the_right_way():
    assert epsilon([(1.0, 0.01, 100)], 1e-5) == pytest.approx(accountant_epsilon([(1.0, 0.01, 100)], 1e-5))
    history = [(1.0, 0.05, 30), (2.0, 0.1, 20)]  # an inherited parent's training, then the child's
    assert epsilon(history, 1e-5) == pytest.approx(accountant_epsilon(history, 1e-5))
    assert epsilon([(1.0, 0.01, 100)], 1e-5) < epsilon([(1.0, 0.01, 400)], 1e-5)  # more steps: more ε
    assert epsilon([(2.0, 0.01, 100)], 1e-5) < epsilon([(1.0, 0.01, 100)], 1e-5)  # more noise: less ε
    assert epsilon(history, 1e-5) > epsilon(history[1:], 1e-5)  # the parent's training counts
    assert epsilon([], 1e-5) == 0.0


def test_sample_rate_is_the_worst_off_rows():
    assert sample_rate(8, 400) == 0.02
    assert sample_rate(8, 4) == 1.0
    # 2 of 8 rows per batch from a replay buffer of 20 rows: those rows are drawn more often
    assert sample_rate(8, 400, replay_rows=20, replay_ratio=0.25, steps=10) == pytest.approx(2 / 20)
    assert sample_rate(8, 60, replay_rows=1000, replay_ratio=0.25, steps=10) == pytest.approx(6 / 60)


def test_a_private_evaluation_records_the_accountants_epsilon(base, blocks):
    result = evaluate_genome(base, blocks, HP, 3, TRAINING, CPU)
    rate = HP["per_device_train_batch_size"] / len(blocks["train"])
    expected = accountant_epsilon([(1.0, rate, 6)], 1e-5)
    assert result["curve"]["epsilon"] == pytest.approx(expected)
    assert result["objectives"]["epsilon"] == pytest.approx(expected)
    assert result["curve"]["privacy"]["history"] == [[1.0, rate, 6]]
    plain = evaluate_genome(base, blocks, {k: v for k, v in HP.items() if k != "privacy"}, 3, TRAINING, CPU)
    assert "epsilon" not in plain["objectives"] and "epsilon" not in plain["curve"]
    # the gene overrides the section's noise: more noise, less ε
    noisier = evaluate_genome(base, blocks, HP | {"noise_multiplier": 3.0}, 3, TRAINING, CPU)
    assert noisier["objectives"]["epsilon"] < result["objectives"]["epsilon"]
    assert not any(hasattr(p, "grad_sample") for p in base.parameters())  # the hooks went with the adapter


def test_with_replay_epsilon_covers_the_replayed_rows_too(base, blocks):
    replay = np.random.default_rng(1).integers(VOCAB, size=(6, BLOCK))  # a small buffer: its rows are drawn often
    result = evaluate_genome(base, blocks | {"replay": replay}, HP | {"replay_ratio": 0.25}, 3, TRAINING, CPU)
    assert result["curve"]["privacy"]["sample_rate"] == pytest.approx(1 / 6)  # one replay row of 4, of 6
    alone = evaluate_genome(base, blocks, HP, 3, TRAINING, CPU)
    assert result["objectives"]["epsilon"] > alone["objectives"]["epsilon"]


def test_private_training_is_deterministic_and_resumes_exactly(base, blocks):
    whole = evaluate_genome(base, blocks, HP, 5, TRAINING, CPU)
    again = evaluate_genome(base, blocks, HP, 5, TRAINING, CPU)
    paused = evaluate_genome(base, blocks, HP, 5, TRAINING, CPU, stop_at=2)
    resumed = evaluate_genome(base, blocks, HP, 5, TRAINING, CPU, resume=paused["state"])
    for other in (again, resumed):
        for key, value in whole["adapter"].items():
            np.testing.assert_array_equal(other["adapter"][key], value)
        assert other["objectives"] == whole["objectives"]
    assert paused["curve"]["privacy"]["history"][-1][2] == 2
    assert paused["objectives"]["epsilon"] < whole["objectives"]["epsilon"]
    assert resumed["steps"] == 6 and resumed["curve"]["privacy"]["history"] == whole["curve"]["privacy"]["history"]
    other_seed = evaluate_genome(base, blocks, HP, 6, TRAINING, CPU)
    assert any(not np.array_equal(other_seed["adapter"][k], v) for k, v in whole["adapter"].items())


def test_gradient_accumulation_gives_the_same_private_step(base, blocks):
    one = evaluate_genome(base, blocks, HP, 5, TRAINING, CPU)
    two = evaluate_genome(base, blocks, HP | {"gradient_accumulation_steps": 2}, 5, TRAINING, CPU)
    for key, value in one["adapter"].items():
        np.testing.assert_allclose(two["adapter"][key], value, rtol=1e-4, atol=1e-6)
    assert two["objectives"]["epsilon"] == one["objectives"]["epsilon"]


def test_an_inheriting_child_accounts_its_parents_training(base, blocks):
    parent = evaluate_genome(base, blocks, HP, 1, TRAINING, CPU)
    child_hp = HP | {"r": 2, "noise_multiplier": 2.0, "max_steps": 4}
    inherit = {"adapter": parent["adapter"], "hp": HP, "privacy": parent["curve"]["privacy"]}
    child = evaluate_genome(base, blocks, child_hp, 2, TRAINING, CPU, inherit=inherit)
    rate = 4 / len(blocks["train"])
    history = [[1.0, rate, 6], [2.0, rate, 4]]
    assert child["curve"]["privacy"]["history"] == history
    assert child["objectives"]["epsilon"] == pytest.approx(accountant_epsilon(history, 1e-5))
    assert "privacy" not in child["inherited"]
    # paused and resumed, the child still counts its parent's steps
    paused = evaluate_genome(base, blocks, child_hp, 2, TRAINING, CPU, stop_at=1, inherit=inherit)
    resumed = evaluate_genome(base, blocks, child_hp, 2, TRAINING, CPU, resume=paused["state"])
    assert resumed["curve"]["privacy"]["history"] == history
    assert resumed["objectives"] == child["objectives"]


def test_private_training_on_a_llama(blocks):
    config = BuildConfig(family="llama", n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)
    llama = build_model(config, VOCAB, BLOCK, seed=0)
    hp = HP | {"target_modules": ["q_proj", "v_proj", "down_proj"], "fan_in_fan_out": False}
    result = evaluate_genome(llama, blocks, hp, 0, TRAINING, CPU)
    assert math.isfinite(result["objectives"]["val_loss"]) and result["objectives"]["epsilon"] > 0


def test_private_training_of_a_classifier_clips_per_example(blocks):
    """Classification rows: one cross-entropy per example; the private head and adapter train, ε is recorded."""
    from evolm import rows

    model = build_model(BuildConfig(family="bert", n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB), VOCAB, BLOCK,
                        seed=0, classes=["a", "b", "c"])
    labelled = np.zeros(40, dtype=rows.class_dtype(BLOCK))
    labelled["input_ids"], labelled["attention_mask"] = blocks["train"], 1
    labelled["label"] = np.arange(40) % 3
    hp = HP | {"target_modules": ["query", "value"], "fan_in_fan_out": False, "task_type": "SEQ_CLS"}
    head = model.classifier.weight.detach().clone()
    result = evaluate_genome(model, {"train": labelled, "validation": labelled[:16]}, hp, 0, TRAINING, CPU)
    assert math.isfinite(result["objectives"]["val_loss"]) and result["objectives"]["epsilon"] > 0
    trained_head = next(v for k, v in result["adapter"].items() if "classifier" in k and k.endswith("weight"))
    assert not np.allclose(trained_head, head.numpy())  # the head trained privately too
    assert torch.equal(model.classifier.weight, head)  # and the base's own head is untouched


def test_private_training_on_a_bfloat16_base(base, blocks):
    import copy

    half = copy.deepcopy(base).to(torch.bfloat16)  # model.dtype: bfloat16; PEFT keeps the adapter in float32
    result = evaluate_genome(half, blocks, HP, 0, TRAINING, CPU)
    assert math.isfinite(result["objectives"]["val_loss"]) and result["objectives"]["epsilon"] > 0


def test_a_layer_opacus_cannot_follow_is_a_failed_evaluation_with_its_error(base, blocks):
    executor = LocalExecutor(threads=1)
    executor.set_stage(StagePayload("stage", ModelPayload.of(base), blocks, TRAINING))
    results = []
    request = EvalRequest("g1", HP | {"target_modules": ["wte"], "fan_in_fan_out": False}, 0)  # an embedding
    executor.map([request, EvalRequest("g2", HP, 0)], results.append)
    failed, fine = results
    assert failed["status"] == "failed" and failed["adapter"] is None
    assert failed["error"].startswith("ValueError: training.privacy: Opacus computed no per-sample gradient for")
    assert "adapt only linear layers (target_modules) or turn training.privacy off" in failed["error"]
    assert fine["status"] == "ok" and fine["objectives"]["epsilon"] > 0  # the next evaluation is unharmed


def private_experiment(corpora, tmp_path, **search):
    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"] = raw["stages"][:1]
    raw["training"]["privacy"] = {"max_grad_norm": 1.0}
    raw["search"] |= {"objectives": ["val_loss", "epsilon"], "population_size": 4, "offspring_size": 4,
                      "generations": 1, **search}
    raw["search"]["space"]["noise_multiplier"] = {"type": "log_uniform", "low": 0.3, "high": 5.0}
    return raw


def test_epsilon_is_recorded_and_searched_in_a_real_run(corpora, tmp_path):
    config = parse_config(private_experiment(corpora, tmp_path))
    assert config.training.privacy.delta == 1e-5 and config.search.objectives == ["val_loss", "epsilon"]
    run_dir = tmp_path / "private"
    ContinualRun(config, run_dir, lambda: LocalExecutor(threads=1)).run()
    records = [r for r in read_jsonl(run_dir / "evaluations.jsonl") if r["status"] == "ok"]
    assert len(records) >= 6
    trained = [r for r in records if not r["cached"]]
    for r in records:
        assert r["objectives"]["epsilon"] == pytest.approx(r["curve"]["epsilon"])
        assert r["curve"]["privacy"]["history"][-1][0] == pytest.approx(r["values"]["noise_multiplier"])
    assert len({round(r["objectives"]["epsilon"], 6) for r in trained}) > 2  # ε varies: a front to search
    children = [r for r in trained if r["inherited"]]
    assert children, "a child of generation 1 inherits its parent's adapter"
    by_id = {r["genome_id"]: r for r in trained}
    for child in children:
        parent = by_id[child["inherited"]["adapter_of"]]
        assert child["curve"]["privacy"]["history"][:-1] == parent["curve"]["privacy"]["history"]
        assert child["objectives"]["epsilon"] > epsilon(child["curve"]["privacy"]["history"][-1:], 1e-5)


def test_successive_halving_counts_every_step_of_a_private_training(corpora, tmp_path):
    raw = private_experiment(corpora, tmp_path, halving={"rungs": 2, "reduction_factor": 2}, generations=0)
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 4, "high": 8}
    run_dir = tmp_path / "halving"
    ContinualRun(parse_config(raw), run_dir, lambda: LocalExecutor(threads=1)).run()
    records = read_jsonl(run_dir / "evaluations.jsonl")
    promoted = [r for r in records if r["status"] == "ok" and not r["halted"]]
    assert promoted and any(r["halted"] for r in records)
    for r in records:  # the paused rung's steps and the resumed ones, in one history entry
        assert r["curve"]["privacy"]["history"][-1][2] == r["steps"] == r["curve"]["steps"]
    for r in promoted:
        assert r["steps"] == r["values"]["max_steps"]


def test_epsilon_on_ray_equals_local(corpora, tmp_path, ray_session):
    from evolm.executor import RayExecutor

    config = parse_config(private_experiment(corpora, tmp_path, population_size=3, offspring_size=2))
    ContinualRun(config, tmp_path / "local", lambda: LocalExecutor(threads=1)).run()
    ContinualRun(config, tmp_path / "ray", lambda: RayExecutor(config.ray)).run()
    local, ray = ([(r["genome_id"], r["objectives"]) for r in read_jsonl(tmp_path / d / "evaluations.jsonl")]
                  for d in ("local", "ray"))
    assert sorted(local) == sorted(ray) and all("epsilon" in o for _, o in local)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["search"].update(objectives=["val_loss", "epsilon"]),
     "search.objectives: epsilon is the privacy spent by DP training, and training.privacy is off; add "
     "training.privacy: {noise_multiplier: 1.0, max_grad_norm: 1.0} or drop epsilon"),
    (lambda r: r["search"]["space"].update(noise_multiplier={"type": "uniform", "low": 0.5, "high": 2}),
     "search.space.noise_multiplier: the DP noise only exists with training.privacy, which is off; add "
     "training.privacy: {max_grad_norm: 1.0} or remove the gene"),
    (lambda r: r["training"].update(privacy={"max_grad_norm": 1.0}, gradient_checkpointing=True),
     "training.gradient_checkpointing: not with training.privacy"),
    (lambda r: r["training"].update(privacy={"max_grad_norm": 1.0})
     or r["search"]["space"].update(noise_multiplier={"type": "uniform", "low": 0, "high": 2}),
     "search: space.noise_multiplier: value 0.0 is outside what the fine-tune accepts: noise_multiplier must be > 0"),
    (lambda r: r["training"].update(privacy={"max_grad_norm": 0}), "training.privacy.max_grad_norm"),
    (lambda r: r["training"].update(privacy={"delta": 1.5}), "training.privacy.delta"),
    (lambda r: r["training"].update(privacy={"noise": 1.0}), "training.privacy.noise: unknown key"),
])
def test_bad_privacy_settings_are_one_line_naming_the_field(corpora, tmp_path, mutate, message):
    raw = tiny_experiment(corpora, tmp_path)
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_bad_privacy_setting_exits_2_through_the_cli(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["objectives"] = ["val_loss", "epsilon"]
    done = evolm("run", write_experiment(tmp_path / "dp.yaml", raw))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "search.objectives: epsilon" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.yaml"]  # no run directory begun
