"""Forgetting-aware defaults: merge strength searched, a base model's own domain, the config's checks,
the orthogonality and merge_scale genes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.evolution import Evolution
from evolm.executor import LocalExecutor
from evolm.interference import OrthogonalityPenalty, update_subspaces
from evolm.jsonfiles import read_jsonl
from evolm.models import build_model
from evolm.status import format_status, run_status
from evolm.strength import interpolate, score_merges
from evolm.train import adapter_on, evaluate_genome
from evolm.winners import MergeCandidate
from tests.conftest import ROOT, tiny_experiment, write_experiment


def tiny_model(seed=0):
    from evolm.config import BuildConfig

    return build_model(BuildConfig(family="gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=400), 400, 32, seed)


# ----- config --------------------------------------------------------------------------------------
def test_defaults_keep_earlier_domains_when_there_are_some(corpora, tmp_path):
    config = parse_config(tiny_experiment(corpora, tmp_path))
    assert config.search.objectives == ["val_loss", "retention_loss"]
    assert config.search.winner.rule == "min_val_loss_within_forgetting"
    assert config.merge.strengths == [0.1, 0.2, 0.3, 0.5, 0.7, 1.0] and config.merge.candidates == 3
    one = tiny_experiment(corpora, tmp_path)
    one["stages"] = one["stages"][:1]
    del one["model"]["pretrain"]
    single = parse_config(one)  # nothing to forget: the plain search
    assert single.search.objectives == ["val_loss"] and single.search.winner.rule == "min_first"
    chosen = tiny_experiment(corpora, tmp_path)
    chosen["search"]["objectives"] = ["val_loss"]
    assert parse_config(chosen).search.winner.rule == "min_first"  # what the user wrote wins


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r["merge"].update(strengths=[0.5, 1.5]), ["merge.strengths", "(0, 1]", "1.5"]),
    (lambda r: r["merge"].update(strengths=[0.0, 1.0]), ["merge.strengths", "(0, 1]"]),
    (lambda r: r["merge"].update(strengths=[]), ["merge.strengths", "at least 1"]),
    (lambda r: (r["stages"].pop(), r["model"].pop("pretrain"), r["search"].update(objectives=["val_loss", "retention_loss"])),
     ["retention_loss", "model.domain"]),
    (lambda r: r["model"].update(domain={"train": "missing.txt"}), ["model.domain.train", "file not found"]),
    (lambda r: r["model"].update(domain={"train": r["stages"][0]["train"]}), ["model.pretrain already declares"]),
    (lambda r: r["search"].update(objectives=["val_loss"], winner={"rule": "min_val_loss_within_forgetting"}),
     ["needs objectives val_loss and retention_loss"]),
])
def test_bad_input_is_one_line_exit_2_nothing_written(corpora, tmp_path, mutate, words):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw.setdefault("merge", {})
    mutate(raw)
    exp = write_experiment(tmp_path / "exp.yaml", raw)
    done = subprocess.run([sys.executable, "-m", "evolm.cli", "run", str(exp), "--no-ray"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert all(w in message for w in words), message
    assert not (tmp_path / "results").exists()


# ----- strength scoring ----------------------------------------------------------------------------
def test_strength_points_pareto_and_choice(tmp_path):
    base, merged = tiny_model(0), tiny_model(1)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    def distance(model):
        with torch.no_grad():
            return sum(float((p - q).norm()) for p, q in zip(model.parameters(), base.parameters()))

    target = interpolate(base, merged, 0.5)
    # a real trade-off: val_loss falls and retention_loss grows with the distance from the base
    measure = lambda m: {"val_loss": -distance(m), "retention_loss": distance(m)}  # noqa: E731
    seen = []
    evo = Evolution({}, parse_config_search(), 0, 2)
    rule = {"rule": "min_val_loss_within_forgetting", "max_forgetting": 1e9, "base_retention": 0.0}
    points, _ = score_merges(base, [MergeCandidate("best", [], merged)], [0.25, 0.5, 1.0], measure,
                             ["val_loss", "retention_loss"], rule, evo.fitness_class, lambda _: None, seen.append)
    assert [p.strength for p in points] == [0.25, 0.5, 1.0] and len(seen) == 3
    assert all(p.pareto for p in points)  # every strength trades one objective for the other
    assert [p.chosen for p in points] == [False, False, True]  # no budget: the best learner
    tight = dict(rule, max_forgetting=(points[1].retention_loss - rule["base_retention"]) + 1e-6)
    points, chosen = score_merges(base, [MergeCandidate("best", [], merged)], [0.25, 0.5, 1.0], measure,
                                  ["val_loss", "retention_loss"], tight, evo.fitness_class, lambda _: None)
    model = chosen.model
    chosen = next(p for p in points if p.chosen)
    assert chosen.strength == 0.5
    for (name, p), q in zip(model.named_parameters(), target.parameters()):
        assert torch.allclose(p, q), name
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_sd.items())  # the base is untouched


def parse_config_search():
    from evolm.config import SearchConfig

    return SearchConfig()


@pytest.fixture(scope="module")
def domain_run(corpora, tmp_path_factory):
    """A loaded-style base (no pretraining) with its own domain declared by model.domain."""
    tmp = tmp_path_factory.mktemp("domain")
    raw = tiny_experiment(corpora, tmp)
    raw["model"]["domain"] = {"name": "prose", "train": str(corpora / "general.txt")}
    del raw["model"]["pretrain"]
    raw["merge"] = {"strengths": [0.5, 1.0], "candidates": 2}
    raw["search"]["objectives"] = ["val_loss"]  # a hall of fame of several genomes: a runner-up to try
    ContinualRun(parse_config(raw), tmp / "run", lambda: LocalExecutor()).run()
    return tmp / "run"


def test_a_declared_base_domain_is_retained_and_measured(domain_run):
    matrix = json.loads((domain_run / "loss_matrix.json").read_text())
    assert matrix["columns"] == ["prose", "code", "qa"] and matrix["learned_at"][0] == 0
    evals = read_jsonl(domain_run / "evaluations.jsonl")
    # stage 1 already has an earlier domain: the base's own
    assert all(e["objectives"]["retention_loss"] > 0 for e in evals if e["status"] == "ok")
    summary = json.loads((domain_run / "summary.json").read_text())["stages"]
    curve = read_jsonl(domain_run / "merge_curve.jsonl")
    for s in summary:  # two candidates (the winner, the runner-up) at two strengths
        points = s["merge_curve"]
        assert len(points) == 4 and sum(p["chosen"] for p in points) == 1
        assert len({p["genomes"][0] for p in points}) == 2
        chosen = next(p for p in points if p["chosen"])
        assert s["merge_strength"] == chosen["strength"] and s["winner"]["id"] == chosen["genomes"][0]
        earlier = ["prose", "code"][: s["stage"]]
        assert all(sorted(p["domain_losses"]) == sorted(earlier) and p["forgetting"] >= 0 for p in points)
        assert [p["strength"] for p in curve if p["stage"] == s["stage"]] == [0.5, 1.0, 0.5, 1.0]
        assert (domain_run / "adapters" / f"stage-{s['stage']}" / f"{s['merged'][0]}.safetensors").exists()
    text = format_status(run_status(domain_run))
    assert "merged     stage 1 code: best at strength" in text


# ----- genes ---------------------------------------------------------------------------------------
def test_update_subspace_and_orthogonality_penalty():
    torch.manual_seed(0)
    first = {"w": torch.zeros(6, 8)}
    u = torch.linalg.qr(torch.randn(8, 2))[0].T  # a 2-dimensional input subspace
    current = {"w": torch.randn(6, 2) @ u}
    sub = update_subspaces(first, current, transposed=False)["w"]
    assert sub.shape[0] <= 2 and sub.shape[1] == 8
    proj = torch.from_numpy(sub).T @ torch.from_numpy(sub)
    assert torch.allclose(proj @ u.T, u.T, atol=1e-5)  # the planted subspace is recovered


def test_orthogonality_gene_pushes_the_adapter_out_of_earlier_subspaces():
    model = tiny_model(0)
    blocks = {"train": np.random.default_rng(0).integers(0, 400, (64, 32)), "validation":
              np.random.default_rng(1).integers(0, 400, (8, 32))}
    training = {"eval_batch_size": 8, "eval_max_batches": 1}
    names = [n for n, p in model.named_parameters() if n.endswith("attn.c_attn.weight")]
    rng = torch.Generator().manual_seed(3)
    subspaces = {n: torch.linalg.qr(torch.randn(32, 4, generator=rng))[0].T.contiguous().numpy() for n in names}
    hp = {"learning_rate": 1e-2, "max_steps": 20, "per_device_train_batch_size": 8, "r": 4, "lora_alpha": 8,
          "lora_dropout": 0.0, "target_modules": ["c_attn"], "fan_in_fan_out": True}

    def overlap(weight):
        out = evaluate_genome(model, blocks, hp | {"orthogonality": weight}, 0, training, torch.device("cpu"),
                              subspaces=subspaces)
        a = [v for k, v in out["adapter"].items() if "lora_A" in k]
        return sum(float(np.sum((x @ subspaces[n].T) ** 2)) for x, n in zip(a, names))

    assert overlap(10.0) < 0.5 * overlap(0.0)
    with adapter_on(model, hp, 0, torch.device("cpu")) as peft_model:
        assert OrthogonalityPenalty(peft_model, subspaces, 1.0)().item() > 0
        assert not OrthogonalityPenalty(peft_model, subspaces, 0.0)  # off: no term at all


def test_merge_scale_gene_scales_the_kept_adapter():
    model = tiny_model(0)
    blocks = {"train": np.random.default_rng(0).integers(0, 400, (32, 32)),
              "validation": np.random.default_rng(1).integers(0, 400, (8, 32))}
    hp = {"learning_rate": 1e-2, "max_steps": 5, "per_device_train_batch_size": 4, "r": 2, "lora_alpha": 4,
          "lora_dropout": 0.0, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    training = {"eval_batch_size": 8, "eval_max_batches": 1}
    full = evaluate_genome(model, blocks, hp, 0, training, torch.device("cpu"))
    half = evaluate_genome(model, blocks, hp | {"merge_scale": 0.5}, 0, training, torch.device("cpu"))
    for k, v in full["adapter"].items():
        expected = 0.5 * v if "lora_B" in k else v
        assert np.allclose(half["adapter"][k], expected, atol=1e-6), k
    assert half["objectives"]["val_loss"] != full["objectives"]["val_loss"]  # measured at the scale kept


def test_stages_appended_to_a_single_stage_run_keep_its_search(corpora, tmp_path):
    from evolm.api import resume_config

    one = tiny_experiment(corpora, tmp_path)
    one["stages"] = one["stages"][:1]
    del one["model"]["pretrain"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "experiment.json").write_text(json.dumps(parse_config(one).model_dump(mode="json")))
    two = dict(one, stages=tiny_experiment(corpora, tmp_path)["stages"])
    extended = resume_config(run_dir, two)
    assert [s.name for s in extended.stages] == ["code", "qa"]
    assert extended.search.objectives == ["val_loss"] and extended.search.winner.rule == "min_first"
    chosen = dict(two, search=dict(two["search"], objectives=["val_loss", "retention_loss"]))
    with pytest.raises(Exception, match="search.objectives"):  # a search the user changed is still refused
        resume_config(run_dir, chosen)


def test_a_gain_on_one_earlier_domain_does_not_pay_for_a_loss_on_another():
    from evolm.strength import forgetting_of

    out = forgetting_of({"a": 4.0, "b": 6.0}, {"a": 5.0, "b": 5.5}, {"a": 10, "b": 30})
    assert out["retention_loss"] == (10 * 4.0 + 30 * 6.0) / 40  # as one evaluation of the blocks gives it
    assert out["forgetting"] == 30 * 0.5 / 40  # b's loss counts, a's gain does not offset it
    assert forgetting_of({}, {}, {}) == {"retention_loss": None}
