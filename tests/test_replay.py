"""Replay buffer bounds and determinism, batch-mix accounting, and train_loop without replay unchanged."""
import numpy as np
import pytest
import torch

from evolm.config import BuildConfig
from evolm.models import build_model
from evolm.replay import ReplayBuffer, mix_batch_indices, replay_counts, replay_mix
from evolm.train import adapter_on, fine_tune


def numbered_blocks(n, block_size=4, start=0):
    """Block i holds the tokens start+i repeated, so a block's origin can be read off its content."""
    return np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], block_size, axis=1)


def test_buffer_keeps_at_most_the_bound_per_stage_in_stage_order():
    buf = ReplayBuffer(max_blocks_per_stage=10, seed=0)
    kept_a = buf.add("a", numbered_blocks(100))
    buf.add("b", numbered_blocks(5, start=1000))
    assert len(kept_a) == 10 and len(buf) == 15 and buf.stages == ["a", "b"]
    rows = buf.blocks()[:, 0]
    assert rows.shape == (15,) and np.all(np.diff(rows[:10]) > 0)  # distinct rows of a, original order
    assert set(rows[:10]) <= set(range(100)) and list(rows[10:]) == list(range(1000, 1005))
    assert ReplayBuffer(0, seed=0).add("a", numbered_blocks(3)).shape == (0, 4)


def test_same_seed_same_sample_whatever_the_order_of_stages():
    one, two, other = ReplayBuffer(8, seed=3), ReplayBuffer(8, seed=3), ReplayBuffer(8, seed=4)
    one.add("a", numbered_blocks(50))
    one.add("b", numbered_blocks(50, start=100))
    two.add("b", numbered_blocks(50, start=100))
    two.add("a", numbered_blocks(50))
    other.add("a", numbered_blocks(50))
    assert np.array_equal(one.blocks()[:8], two.blocks()[8:])  # stage a's sample is the same
    assert not np.array_equal(one.blocks()[:8], other.blocks())
    one.add("a", numbered_blocks(50))  # adding a stage again replaces it in place
    assert len(one) == 16 and one.stages == ["a", "b"]


def test_buffer_refuses_blocks_of_another_size():
    buf = ReplayBuffer(4, seed=0)
    buf.add("a", numbered_blocks(3, block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        buf.add("b", numbered_blocks(3, block_size=5))
    with pytest.raises(ValueError, match=">= 0"):
        ReplayBuffer(-1, seed=0)


@pytest.mark.parametrize("ratio, batch, steps", [(0.3, 8, 10), (0.25, 4, 7), (0.5, 3, 9), (1.0, 4, 3), (0.0, 4, 3)])
def test_replay_share_per_batch_and_in_total(ratio, batch, steps):
    counts = replay_counts(batch, ratio, steps)
    assert all(abs(c - ratio * batch) < 1 for c in counts)  # floor or ceil of the exact share
    assert abs(sum(counts) - ratio * batch * steps) <= 0.5  # and the total is the rounded share
    plan = mix_batch_indices(n_current=20, n_replay=6, batch_size=batch, replay_ratio=ratio, steps=steps, seed=1)
    assert [len(idx) for idx in plan] == [batch] * steps
    assert [int((idx >= 20).sum()) for idx in plan] == counts
    assert all(idx.min() >= 0 and idx.max() < 26 for idx in plan)


def test_batch_plan_is_deterministic():
    a = mix_batch_indices(30, 10, 8, 0.4, 20, seed=5)
    b = mix_batch_indices(30, 10, 8, 0.4, 20, seed=5)
    c = mix_batch_indices(30, 10, 8, 0.4, 20, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_bad_ratios_and_empty_pools_are_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        replay_counts(8, 1.5, 3)
    with pytest.raises(ValueError, match="replay pool is empty"):
        mix_batch_indices(10, 0, 8, 0.5, 3, seed=0)
    assert replay_mix(numbered_blocks(3), None, 0.5, 4, 3, seed=0) is None
    assert replay_mix(numbered_blocks(3), numbered_blocks(2), 0.0, 4, 3, seed=0) is None


# ----- train_loop ------------------------------------------------------------------------------
HP = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.1, "target_modules": ["c_attn"], "fan_in_fan_out": True,
      "learning_rate": 5e-3, "max_steps": 4, "per_device_train_batch_size": 4, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def base():
    return build_model(BuildConfig(family="gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=300), 300, 16, 0).eval()


def train(base, replay=None, **hp):
    data = np.random.default_rng(0).integers(0, 300, size=(12, 16)).astype(np.int32)
    with adapter_on(base, {**HP, **hp}, 3, torch.device("cpu")) as model:
        curve = fine_tune(model, data, {**HP, **hp}, seed=3, device=torch.device("cpu"), replay=replay)
        return curve, {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}


def test_train_loop_without_replay_is_unchanged(base):
    replay = np.random.default_rng(1).integers(0, 300, size=(6, 16)).astype(np.int32)
    plain_curve, plain = train(base)
    for curve, weights in [train(base, replay=replay, replay_ratio=0.0), train(base, replay=None, replay_ratio=0.5),
                           train(base, replay=replay[:0], replay_ratio=0.5)]:
        assert curve == plain_curve
        assert all(torch.equal(weights[k], plain[k]) for k in plain)
    replayed_curve, _ = train(base, replay=replay, replay_ratio=0.5)
    assert replayed_curve != plain_curve
    assert train(base, replay=replay, replay_ratio=0.5)[0] == replayed_curve  # and reproducible
