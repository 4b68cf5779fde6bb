"""Differentially private training of the adapter: per-sample clipping, Gaussian noise, ε from an accountant.

With ``training.privacy`` every training step of a LoRA evaluation is DP-SGD's step (Abadi et al. 2016):

    g_i   = ∇ loss of sample i                      over the trainable (LoRA) parameters only
    ḡ_i   = g_i · min(1, C / ‖g_i‖)                  per-sample clip, C = ``max_grad_norm``
    g     = (Σ_i ḡ_i + N(0, σ²C² I)) / B             σ = ``noise_multiplier``, B = the batch size

and AdamW takes ``g`` (the frozen base gets no gradient at all). The base's weights never change, so
they need no noise.

Per-sample gradients come from Opacus's ``GradSampleModule``: its hooks on PEFT's ``lora_A`` /
``lora_B`` (plain ``nn.Linear``) compute every sample's gradient from one batched backward pass, so
a private step costs about as much as a normal one. Micro-batches of one would also be exact but
B times slower; Opacus handles every module LoRA adds to the models evolm adapts (linear layers).
Opacus's ``DPOptimizer`` is not used: its noise comes from torch's global generator, and here the
noise comes from a generator seeded by the evaluation's seed, whose state is part of a paused
training's state, so a private evaluation is deterministic and a resumed one equals one in one go.

ε is Opacus's RDP accountant's for the history of (σ, sample rate q, steps) of everything this
adapter was trained with: with weight inheritance the parent's history is carried into the child's
and composed with its own steps, so the child's ε covers its whole training. q = B / training rows;
with ``replay_ratio`` each batch draws from two pools (the stage's rows and the replay buffer), and q
is the larger of the two rates, so ε covers every row the adapter trained on.

What ε does not cover, honestly: batches are drawn uniformly with replacement at a fixed size (the
training loop's sampler, shared with non-private training), while the RDP analysis assumes Poisson
sampling at rate q (Opacus's ``make_private`` samples so by default): ε is the accountant's value at
that rate, an approximation the analysis does not formally cover. ε is per evaluation: the search
itself (many evaluations on the same data, the choice of a winner by validation loss, a merge of
several winners, the stages before) is not accounted.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from evolm.genome import Hyperparameters
from evolm.replay import replay_counts
from evolm.rows import model_inputs

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacySettings:
    noise_multiplier: float
    max_grad_norm: float
    """The per-sample clip C."""
    delta: float

    @classmethod
    def of(cls, hp: Hyperparameters | dict) -> "PrivacySettings | None":
        """The settings of one training (the ``noise_multiplier`` gene over ``training.privacy``), or
        None when privacy is off."""
        hp = Hyperparameters.of(hp)
        if hp.privacy is None:
            return None
        section = dict(hp.privacy)
        noise = hp.noise_multiplier if hp.noise_multiplier is not None else section["noise_multiplier"]
        return cls(float(noise), float(section["max_grad_norm"]), float(section.get("delta", DEFAULT_DELTA)))


def sample_rate(batch: int, rows: int, replay_rows: int = 0, replay_ratio: float = 0.0, steps: int = 1) -> float:
    """The chance that a given row is in a batch: per pool, rows drawn per batch / rows in the pool;
    with replay the larger of the stage's and the replay buffer's (the worst-off row's rate)."""
    if not replay_rows or not replay_ratio > 0:
        return min(1.0, batch / rows)
    counts = replay_counts(batch, replay_ratio, steps)
    current = (batch - min(counts)) / rows if rows else 0.0
    return min(1.0, max(current, max(counts) / replay_rows))


def epsilon(history: list, delta: float) -> float:
    """ε of a training history ``[(noise_multiplier, sample_rate, steps), ...]`` at ``delta``,
    composed by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def clip_per_sample(grad_samples: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample's gradient (all parameters together) scaled to a norm of at most ``max_norm``;
    also the norms before clipping."""
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grad_samples]).norm(dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grad_samples], norms


def per_sample_losses(model, inputs: dict) -> torch.Tensor:
    """Each sample's loss: its mean next-token loss (labels of -100 ignored), or a classifier's
    cross-entropy on its class; the batch's loss is their mean."""
    labels = inputs["labels"]
    if labels.dim() == 1:  # one class per row
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1].float()
    targets = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counted


def noise_seed(seed: int) -> int:
    """The noise generator's seed: the evaluation's seed, kept apart from its other streams."""
    return int(hashlib.sha256(f"privacy:{seed}".encode()).hexdigest()[:15], 16)


class PrivateTraining:
    """DP-SGD steps on ``model``'s trainable parameters, and the privacy they spend.

    ``backward`` has the signature of ``evolm.train._backward`` and leaves the privatised gradient in
    every trainable parameter's ``.grad``; ``state`` / ``restore`` pause and resume it; ``finish``
    removes the hooks and returns the curve's privacy entries.
    """

    def __init__(self, model, settings: PrivacySettings, rate: float, seed: int, history: list | None = None):
        from opacus import GradSampleModule

        self.settings, self.rate = settings, rate
        self.history = [tuple(h) for h in history or []]
        """What the adapter was trained with before this training (an inherited parent's)."""
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.generator = torch.Generator().manual_seed(noise_seed(seed))
        self.sample_norms: torch.Tensor | None = None
        """The last micro-batch's per-sample gradient norms before clipping."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated attributes, probed
                self.hooks = GradSampleModule(model, loss_reduction="sum", strict=True)
        except (NotImplementedError, ValueError) as exc:
            raise ValueError(f"training.privacy: Opacus cannot compute per-sample gradients of this adapter "
                             f"({_first_line(exc)}); adapt only linear layers (target_modules) or turn "
                             f"training.privacy off") from None

    def backward(self, model, batch, device: torch.device, parts: int) -> float:
        """Forward and backward of one batch (in ``parts`` micro-batches), each sample's gradient
        clipped, their sum noised and divided by the batch size into ``.grad``; the batch's mean loss."""
        inputs = batch if isinstance(batch, dict) else model_inputs(batch, device)
        size = len(inputs["labels"])
        summed = [torch.zeros_like(p) for p in self.params]
        total = 0.0
        for rows in torch.tensor_split(torch.arange(size), min(max(1, parts), size)):
            chunk = {k: v[rows.to(v.device)] for k, v in inputs.items()}
            # no autocast (unlike ``_backward``): Opacus's hooks then see each LoRA layer's own dtype, as on
            # a CPU, where a bfloat16 base with float32 adapters is tested; untested under GPU autocast
            with warnings.catch_warnings():
                # the embeddings are frozen, so the first hooked module's inputs need no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses = per_sample_losses(model, chunk)
                if not math.isfinite(losses.sum().item()):
                    self._clear()
                    return losses.mean().item()
                losses.sum().backward()
            clipped, self.sample_norms = clip_per_sample(self._grad_samples(), self.settings.max_grad_norm)
            for acc, g in zip(summed, clipped):
                acc += g.sum(dim=0)
            total += losses.sum().item()
            self._clear()
        std = self.settings.noise_multiplier * self.settings.max_grad_norm
        for p, acc in zip(self.params, summed):
            noise = torch.normal(0.0, std, acc.shape, generator=self.generator).to(acc.device, acc.dtype)
            p.grad = (acc + noise) / size
        return total / size

    def _grad_samples(self) -> list[torch.Tensor]:
        missing = [n for n, p in zip(self.names, self.params) if getattr(p, "grad_sample", None) is None]
        if missing:  # its module's hooks never fired (a layer type Opacus cannot follow)
            self._clear()
            self.hooks._close()
            raise ValueError(f"training.privacy: Opacus computed no per-sample gradient for {missing[0]} (a layer "
                             f"its hooks cannot follow); adapt only linear layers (target_modules) or turn "
                             f"training.privacy off")
        return [p.grad_sample for p in self.params]

    def _clear(self) -> None:
        for p in self.params:
            p.grad_sample, p.grad = None, None

    def state(self) -> dict[str, np.ndarray]:
        """What a paused training needs to go on: the noise stream and the history before it."""
        return {"privacy.rng": self.generator.get_state().numpy().copy(),
                "privacy.history": np.array(self.history, dtype=np.float64).reshape(-1, 3)}

    def restore(self, state: dict) -> None:
        self.generator.set_state(torch.from_numpy(state["privacy.rng"].copy()))
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["privacy.history"]]

    def finish(self, steps: int) -> dict:
        """Remove the hooks; the curve's entries: ``epsilon`` and ``privacy`` (δ, σ, C and the history
        of everything the adapter was trained with, which an inheriting child carries on)."""
        self.hooks._close()
        history = self.history + [(self.settings.noise_multiplier, self.rate, int(steps))]
        return {"epsilon": epsilon(history, self.settings.delta),
                "privacy": {"delta": self.settings.delta, "noise_multiplier": self.settings.noise_multiplier,
                            "max_grad_norm": self.settings.max_grad_norm, "sample_rate": self.rate,
                            "history": [list(h) for h in history]}}


def private_training(model, hp, seed: int, rows: int, replay_rows: int = 0, resume: dict | None = None,
                     history: list | None = None) -> PrivateTraining | None:
    """The DP-SGD steps of one training, or None when ``hp`` has no ``privacy``. ``rows`` /
    ``replay_rows``: the pools batches are drawn from; ``history``: an inherited adapter's."""
    settings = PrivacySettings.of(hp)
    if settings is None:
        return None
    hp = Hyperparameters.of(hp)
    rate = sample_rate(int(hp.per_device_train_batch_size), rows, replay_rows, float(hp.replay_ratio),
                       int(hp.max_steps))
    private = PrivateTraining(model, settings, rate, seed, history)
    if resume is not None:
        private.restore(resume)
    return private


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
