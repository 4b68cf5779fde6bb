"""Experience replay: a bounded sample of earlier stages' training blocks, mixed into new batches.

After a stage is merged, ``ReplayBuffer.add`` keeps a deterministic sample of its training token
blocks. While a later stage trains, a share ``replay_ratio`` of every batch is drawn from the
buffer and the rest from the current stage (``mix_batch_indices``). Everything is a function of
seeds and data, so a resumed run rebuilds the same buffer by adding the finished stages again.
"""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np

from evolm import rows

log = logging.getLogger(__name__)


class ReplayBuffer:
    """Per-stage buffers of token blocks, each at most ``max_blocks_per_stage`` rows."""

    def __init__(self, max_blocks_per_stage: int, seed: int):
        if not isinstance(max_blocks_per_stage, int) or max_blocks_per_stage < 0:
            raise ValueError(f"max_blocks_per_stage must be an integer >= 0. Current value: {max_blocks_per_stage!r}")
        self.max_blocks_per_stage, self.seed = max_blocks_per_stage, seed
        self._stages: dict[str, np.ndarray] = {}

    def add(self, stage_name: str, blocks: np.ndarray) -> np.ndarray:
        """Keep (and return) a sample of at most ``max_blocks_per_stage`` rows of ``blocks``.

        The sample is the first rows of a permutation seeded by (seed, stage_name), put back in the
        original row order; it does not depend on the other stages or the order they were added.
        Adding a stage name again replaces its sample in place.
        """
        blocks = np.asarray(blocks)
        if blocks.ndim != (2 if blocks.dtype.names is None else 1):
            raise ValueError(f"replay blocks of '{stage_name}' must be a 2-D (n, block_size) array or "
                             f"labelled rows (evolm.rows); got shape {blocks.shape}")
        width = self.block_size
        if width is not None and rows.width(blocks) != width:
            raise ValueError(f"replay blocks of '{stage_name}' have block_size {rows.width(blocks)} but the "
                             f"buffer holds blocks of {width}")
        if len(blocks) > self.max_blocks_per_stage:
            rng = np.random.default_rng(_stage_seed(self.seed, stage_name))
            chosen = np.sort(rng.permutation(len(blocks))[: self.max_blocks_per_stage])
            kept = blocks[chosen].copy()
        else:
            kept = blocks.copy()
        self._stages[stage_name] = kept
        log.info("replay buffer: %d of %d blocks of '%s' kept", len(kept), len(blocks), stage_name)
        return kept

    def blocks(self) -> np.ndarray:
        """All buffered blocks, stage after stage in the order they were first added."""
        if not self._stages:
            return np.zeros((0, 0), dtype=np.int32)
        return rows.concat(list(self._stages.values()))

    @property
    def stages(self) -> list[str]:
        return list(self._stages)

    @property
    def block_size(self) -> int | None:
        return next((rows.width(b) for b in self._stages.values()), None)

    def __len__(self) -> int:
        return sum(len(b) for b in self._stages.values())


def _stage_seed(seed: int, stage_name: str) -> int:
    return int(hashlib.sha256(f"replay:{seed}:{stage_name}".encode()).hexdigest()[:16], 16)


def replay_counts(batch_size: int, replay_ratio: float, steps: int) -> list[int]:
    """Replay rows in each of ``steps`` batches: round(r·b·(s+1)) − round(r·b·s) for step s.

    Each batch gets floor(r·b) or ceil(r·b) replay rows, and the total is round(r·b·steps): within
    half a block of the exact share over the whole run.
    """
    if not 0.0 <= replay_ratio <= 1.0:
        raise ValueError(f"replay_ratio must be between 0 and 1. Current value: {replay_ratio}")
    target = [math.floor(replay_ratio * batch_size * s + 0.5) for s in range(steps + 1)]
    return [target[s + 1] - target[s] for s in range(steps)]


def mix_batch_indices(n_current: int, n_replay: int, batch_size: int, replay_ratio: float, steps: int,
                      seed: int) -> list[np.ndarray]:
    """Row indices of each batch into ``concatenate([current, replay])``, one int64 array per step.

    Row i < n_current is a current-stage block, row n_current + r is replay block r. Each batch has
    ``replay_counts(...)[step]`` replay rows (after its current rows), all drawn uniformly with
    replacement from ``np.random.default_rng(seed)``, so the plan depends on the arguments only.
    """
    counts = replay_counts(batch_size, replay_ratio, steps)
    if any(counts) and n_replay < 1:
        raise ValueError(f"replay_ratio {replay_ratio} needs replay blocks, but the replay pool is empty")
    if any(c < batch_size for c in counts) and n_current < 1:
        raise ValueError("the current stage has no training blocks to mix with the replay blocks")
    rng = np.random.default_rng(seed)
    plan = []
    for c in counts:
        current = rng.integers(n_current, size=batch_size - c) if c < batch_size else np.zeros(0, np.int64)
        replayed = n_current + rng.integers(n_replay, size=c) if c else np.zeros(0, np.int64)
        plan.append(np.concatenate([current, replayed]).astype(np.int64))
    return plan


def replay_mix(blocks: np.ndarray, replay: np.ndarray | None, replay_ratio: float, batch_size: int, steps: int,
               seed: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The pool ``concatenate([blocks, replay])`` and its batch plan, or ``None`` when nothing is
    replayed (no replay blocks or a zero ratio): then training samples ``blocks`` alone, as before."""
    if replay is None or len(replay) == 0 or not replay_ratio > 0:
        return None
    mismatch = rows.same_kind(blocks, replay)
    if mismatch:
        raise ValueError(f"replay blocks do not match the training blocks ({mismatch}; same block_size needed)")
    pool = rows.concat([blocks, replay])
    return pool, mix_batch_indices(len(blocks), len(replay), batch_size, replay_ratio, steps, seed)
