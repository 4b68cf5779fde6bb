"""What a real pretrained model needs: rotary Llamas survive the trip to a worker, and a failed
evaluation keeps its root cause (not Ray's or evolm's wrapper)."""
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evolm.executor
from evolm.jsonfiles import read_jsonl
from evolm.config import BuildConfig
from evolm.rayconfig import RayConfig
from evolm.errors import ModelError
from evolm.executor import EvalRequest, LocalExecutor, RayExecutor, StagePayload, _failure
from evolm.models import ModelPayload, build_model
from tests.conftest import ROOT, tiny_experiment
from tests.test_train_merge import TRAINING, blocks

LLAMA_TRAINING = {**TRAINING, "max_steps": 2, "eval_max_batches": 1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def llama():
    """A small Llama with rotary embeddings (non-persistent ``inv_freq`` buffers, as every pretrained Llama)."""
    model = build_model(BuildConfig(family="llama", n_layer=2, n_embd=32, n_head=2, vocab_size=400), 400, 32, seed=0)
    assert any("inv_freq" in name for name, _ in model.named_buffers())
    return model.eval()


def stage(model, key="s", payload=None):
    return StagePayload(key, payload or ModelPayload.of(model), {"train": blocks(), "validation": blocks(8, 1)},
                        LLAMA_TRAINING)


def test_a_rotary_llama_round_trips_through_its_payload(llama):
    payload = ModelPayload.of(llama)
    assert "model.rotary_emb.inv_freq" in payload.buffers and not any("inv_freq" in k for k in payload.weights)
    rebuilt = payload.build()
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    x = torch.from_numpy(blocks(2).astype(np.int64))
    with torch.no_grad():
        assert torch.equal(llama(x).logits, rebuilt(x).logits)
    rebuilt.to("cpu")  # what a worker does; tensors left on meta made it raise "Cannot copy out of meta tensor"


def test_a_payload_without_its_buffers_is_refused_by_name(llama):
    payload = ModelPayload.of(llama)
    with pytest.raises(ModelError, match="meta device.*inv_freq"):
        ModelPayload(payload.config, payload.weights).build()


def test_an_evaluation_on_a_rotary_llama_succeeds_in_process(llama):
    executor = LocalExecutor(threads=1)
    executor.set_stage(stage(llama))
    results = []
    executor.map([EvalRequest("g0", LLAMA_TRAINING, seed=0)], results.append)
    (result,) = results
    assert result["status"] == "ok", result.get("error")
    assert np.isfinite(result["objectives"]["val_loss"]) and result["adapter"]


def chained_failure():
    try:
        {}["root_key"]
    except KeyError as exc:
        raise RuntimeError("wrapper " + "x" * 20_000) from exc


def test_an_in_process_failure_records_its_root_cause_and_a_bounded_traceback(llama, monkeypatch):
    def train_and_fail(*args, **kwargs):
        def deep(n):
            return chained_failure() if n == 0 else deep(n - 1)
        deep(300)
    monkeypatch.setattr(evolm.executor, "evaluate_genome", train_and_fail)
    executor = LocalExecutor(threads=1)
    executor.set_stage(stage(llama))
    results = []
    executor.map([EvalRequest("g0", LLAMA_TRAINING, seed=0)], results.append)
    (result,) = results
    assert result["status"] == "failed"
    assert result["error"].startswith("KeyError: 'root_key'") and "RuntimeError: wrapper" in result["error"]
    assert len(result["error"]) < 2000 and len(result["traceback"]) < 5000
    assert "Traceback" in result["traceback"] and "root_key" in result["traceback"]
    assert "chained_failure" in result["traceback"] and "direct cause" in result["traceback"]


def test_failures_on_ray_record_the_root_exception(llama, ray_session):
    executor = RayExecutor(RayConfig(num_workers=1, max_retries=0))
    try:
        results = []
        # a worker whose stage cannot load: the payload lost the rotary buffers
        good = ModelPayload.of(llama)
        executor.set_stage(stage(llama, "broken", ModelPayload(good.config, good.weights)))
        executor.map([EvalRequest("g0", LLAMA_TRAINING, seed=0)], results.append)
        # an evaluation that raises inside training: PEFT refuses a module the model does not have
        executor.set_stage(stage(llama, "fine"))
        executor.map([EvalRequest("g1", {**LLAMA_TRAINING, "target_modules": ["no_such_module"]}, seed=0)],
                     results.append)
    finally:
        executor.close()
    broken, refused = results
    assert broken["status"] == "failed" and "ray::" not in broken["error"]
    assert "ModelError" in broken["error"] and "inv_freq" in broken["error"] and "Traceback" in broken["traceback"]
    assert refused["status"] == "failed" and "ray::" not in refused["error"]
    assert "NoMatchingPeftModuleError" in refused["error"] and "no_such_module" in refused["error"] and refused["traceback"]


def test_a_task_error_from_ray_is_recorded_with_the_workers_exception(ray_session):
    def fails():
        raise ValueError("the real reason " + "y" * 20_000)
    ref = ray_session.remote(fails).remote()
    record = RayExecutor._result(SimpleNamespace(ray=ray_session), ref, EvalRequest("g0", {}, seed=0))
    assert record["status"] == "failed" and record["error"].startswith("worker failed: ValueError: the real reason")
    assert "ray::" not in record["error"] and "\x1b[" not in record["traceback"]
    assert "the real reason" in record["traceback"] and len(record["traceback"]) < 5000


def test_failure_walks_the_exception_chain_to_its_end():
    try:
        try:
            chained_failure()
        except RuntimeError:
            raise OSError("while cleaning up")  # noqa: B904 - raised while handling, as real code does
    except OSError as exc:
        failure = _failure(exc)
    assert failure["error"].startswith("KeyError: 'root_key' (raised as OSError: while cleaning up")
    assert "During handling" in failure["traceback"] and len(failure["traceback"]) < 5000


def test_a_bfloat16_base_runs_two_stages_and_resumes_exactly(corpora, tmp_path):
    """model.dtype bfloat16 on the CPU: the base (and the saved stage models) stay bf16, adapters train in
    float32, and a run killed mid-stage resumes to the same genomes, losses and weights."""
    from safetensors.torch import load_file

    from tests.conftest import write_experiment
    from tests.test_resume import kill_when, run_to_end

    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["model"]["dtype"] = "bfloat16"
    raw["model"]["build"]["family"] = "llama"  # rotary buffers: not saved with the model, kept float32
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 10, "high": 20}
    path = write_experiment(tmp_path / "bf16.yaml", raw)
    run_to_end("run", path, "--name", "whole", "--no-ray")
    cut = tmp_path / "results" / "cut"
    assert kill_when(("run", path, "--name", "cut", "--no-ray"),
                     lambda: (cut / "checkpoints" / "s002-g0000.json").exists())
    run_to_end("resume", cut, "--no-ray")

    def outcome(run_dir):
        evals = [(r["stage"], r["generation"], r["genome_id"], (r["objectives"] or {}).get("val_loss"), r["dtype"])
                 for r in read_jsonl(run_dir / "evaluations.jsonl")]
        return sorted(evals), load_file(str(run_dir / "models" / "stage-2" / "model.safetensors"))

    (whole_evals, whole_w), (cut_evals, cut_w) = outcome(tmp_path / "results" / "whole"), outcome(cut)
    assert whole_evals == cut_evals and {e[4] for e in whole_evals} == {"bfloat16"}
    assert set(whole_w) == set(cut_w) and all(torch.equal(whole_w[k], cut_w[k]) for k in whole_w)
    assert {t.dtype for t in whole_w.values()} == {torch.bfloat16}


def test_float16_on_a_cpu_is_refused_before_anything_is_written(corpora, tmp_path):
    from tests.conftest import write_experiment
    from tests.test_resume import evolm_cmd, env

    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["model"]["dtype"] = "float16"
    path = write_experiment(tmp_path / "fp16.yaml", raw)
    done = subprocess.run(evolm_cmd("run", path, "--name", "r", "--no-ray"), capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "model.dtype: float16 needs a GPU" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "results" / "r").exists()


@pytest.mark.parametrize("executor", ["--no-ray", None])
def test_asking_for_a_gpu_where_there_is_none_stops_with_one_line(corpora, tmp_path, executor):
    from tests.conftest import write_experiment
    from tests.test_resume import env, evolm_cmd

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["ray"] = {"num_workers": 1, "num_gpus_per_trial": 1}
    path = write_experiment(tmp_path / "gpu.yaml", raw)
    done = subprocess.run(evolm_cmd("run", path, "--name", "r", *([executor] if executor else [])),
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ray.num_gpus_per_trial is 1 but") and "set it to 0" in done.stderr
    assert not (tmp_path / "results" / "r").exists()  # refused before anything was written
