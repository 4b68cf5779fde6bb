"""Real PEFT training and merging on tiny GPT-2 and Llama models."""
import dataclasses
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evolm.config import BuildConfig
from evolm.executor import EvalRequest, LocalExecutor, StagePayload
from evolm.genome import hyperparameters
from evolm.merge import attach_adapter, merge_best
from evolm.models import ModelPayload, build_model, save_model, train_tokenizer
from evolm.train import evaluate, evaluate_genome

TRAINING = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3, "max_steps": 6,
            "weight_decay": 0.0, "warmup_ratio": 0.0, "per_device_train_batch_size": 4,
            "eval_batch_size": 8, "eval_max_batches": None, "max_grad_norm": 1.0}
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tokenizer(corpora):
    return train_tokenizer((corpora / "general.txt").read_text().split("\n\n"), 400)


def tiny(family, tokenizer):
    return build_model(BuildConfig(family=family, n_layer=2, n_embd=32, n_head=2, vocab_size=400),
                       len(tokenizer), 32, seed=0).eval()


def blocks(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 300, size=(n, 32)).astype(np.int32)


def training_for(family, **extra):
    return {**TRAINING, "target_modules": TARGETS[family], "fan_in_fan_out": family == "gpt2", **extra}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_model_equals_adapter_model(family, tokenizer, tmp_path):
    base = tiny(family, tokenizer)
    hp = hyperparameters({"layers": [False, True]}, training_for(family))
    result = evaluate_genome(base, {"train": blocks(), "validation": blocks(8, 1)}, hp, seed=1,
                             training=TRAINING, device=torch.device("cpu"))
    assert any(np.abs(v).max() > 0 for k, v in result["adapter"].items() if "lora_B" in k), "adapter did not train"
    assert all(".h.0." not in k and ".layers.0." not in k for k in result["adapter"]), "layer mask ignored"
    x = torch.from_numpy(blocks(4, 2).astype(np.int64))
    with torch.no_grad():
        adapted = attach_adapter(base, hp, result["adapter"])(x).logits
        merged_model = merge_best(base, hp, result["adapter"])
        merged = merged_model(x).logits
        plain = base(x).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the model ...
    assert (merged - adapted).abs().max() < 1e-4  # ... and merging keeps exactly that change

    save_model(merged_model, tokenizer, tmp_path / "stage-1")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stage-1").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, merged)


def test_payload_round_trip_keeps_the_weights(tokenizer):
    base = tiny("gpt2", tokenizer)
    rebuilt = ModelPayload.of(base).build()
    x = torch.from_numpy(blocks(2).astype(np.int64))
    with torch.no_grad():
        assert torch.equal(base(x).logits, rebuilt(x).logits)


def run_requests(tokenizer, hps):
    executor = LocalExecutor(threads=1)
    base = tiny("gpt2", tokenizer)
    executor.set_stage(StagePayload("t", ModelPayload.of(base), {"train": blocks(), "validation": blocks(8, 1)},
                                    training_for("gpt2")))
    results = []
    executor.map([EvalRequest(f"g{i}", hp, seed=i) for i, hp in enumerate(hps)], results.append)
    return results


def test_evaluation_counts_as_done_only_with_a_finite_loss(tokenizer):
    ok, diverged, broken = run_requests(tokenizer, [
        training_for("gpt2"),
        training_for("gpt2", learning_rate=1e30, max_grad_norm=1e30),  # blows up to NaN / inf
        training_for("gpt2", target_modules=["no_such_module"]),       # PEFT raises
    ])
    assert ok["status"] == "ok" and np.isfinite(ok["objectives"]["val_loss"])
    assert diverged["status"] == "failed" and "non-finite" in diverged["error"]
    assert broken["status"] == "failed" and "no_such_module" in broken["error"] and broken["traceback"]
    assert diverged["adapter"] is None and broken["adapter"] is None


def test_evaluate_is_the_mean_token_loss(tokenizer):
    base = tiny("gpt2", tokenizer)
    data = blocks(10)
    whole = evaluate(base, data, batch_size=10)
    split = evaluate(base, data, batch_size=3)
    assert whole == pytest.approx(split, rel=1e-5)
    assert whole == pytest.approx(np.log(len(tokenizer)), rel=0.2)  # an untrained model is near uniform


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_evaluation_leaves_the_base_exactly_as_it_was(family, tokenizer):
    """The adapter is injected into the base in place (no copy), trained, read out and removed."""
    import copy

    base = tiny(family, tokenizer)
    before = copy.deepcopy(base.state_dict())
    modules = [type(m).__name__ for m in base.modules()]
    hp = hyperparameters({}, training_for(family))
    first = evaluate_genome(base, {"train": blocks(), "validation": blocks(8, 1)}, hp, 1, TRAINING, torch.device("cpu"))
    with pytest.raises(RuntimeError):  # a failure mid-evaluation still removes the adapter
        evaluate_genome(base, {"train": blocks(), "validation": blocks(8, 1)}, dataclasses.replace(hp, per_device_train_batch_size=-1),
                        1, TRAINING, torch.device("cpu"))
    again = evaluate_genome(base, {"train": blocks(), "validation": blocks(8, 1)}, hp, 1, TRAINING, torch.device("cpu"))
    assert [type(m).__name__ for m in base.modules()] == modules  # no LoRA layer left behind
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()) and set(before) == set(base.state_dict())
    assert again["objectives"] == first["objectives"]  # and the next evaluation sees the same base
    assert all(np.array_equal(again["adapter"][k], first["adapter"][k]) for k in first["adapter"])


def test_accumulation_and_checkpointing_train_the_same_adapter(tokenizer):
    """Micro-batches and recomputed activations save memory; the trained adapter is the same (up to rounding)."""
    base = tiny("llama", tokenizer)
    data = {"train": blocks(), "validation": blocks(8, 1)}
    # micro-batches draw other dropout masks, so that case runs without dropout; checkpointing replays them
    for dropout, extra in ((0.0, {"gradient_accumulation_steps": 2}), (0.1, {"gradient_checkpointing": True})):
        hp = hyperparameters({}, training_for("llama", lora_dropout=dropout, max_steps=4))
        plain = evaluate_genome(base, data, hp, 1, TRAINING, torch.device("cpu"))
        other = evaluate_genome(base, data, dataclasses.replace(hp, **extra), 1, TRAINING, torch.device("cpu"))
        assert other["objectives"]["val_loss"] == pytest.approx(plain["objectives"]["val_loss"], abs=1e-5)
        assert all(np.allclose(other["adapter"][k], plain["adapter"][k], atol=1e-5) for k in plain["adapter"])
    assert not base.is_gradient_checkpointing  # switched off again with the adapter


def test_the_learning_rate_follows_transformers_schedules():
    from evolm.genome import Hyperparameters
    from evolm.train import lr_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hp = Hyperparameters(learning_rate=1.0, max_steps=10, per_device_train_batch_size=1)
    linear = lr_schedule(dataclasses.replace(hp, warmup_ratio=0.2), 10, opt)
    assert [linear(s) for s in range(4)] == pytest.approx([0.0, 0.5, 1.0, 0.875])
    cosine = lr_schedule(dataclasses.replace(hp, lr_scheduler_type="cosine"), 10, opt)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5)
