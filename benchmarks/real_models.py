"""Real model shapes: evolm's evaluation path against the raw training loop, speed and memory.

    python benchmarks/real_models.py [--model llama100m | <model dir>] [--device cpu | cuda]
                                     [--steps 12] [--batch 4] [--block 128] [--threads 2] [--resume-check]

``llama100m`` is a Llama-architecture model of about 110M parameters built from a config (nothing
downloaded); a directory is any saved causal LM (e.g. the prepared SmolLM2-135M-Instruct).

    raw loop   a fresh process: the base, PEFT's get_peft_model, AdamW, ``steps`` batches; nothing else
    evolm      one Ray worker running evolm's evaluation of the same genome on the same batches size:
               the base shipped as a payload, adapter injected in place, trained, read out, removed

Both use ``threads`` torch threads. Throughput = trained tokens / training seconds (evolm: the
evaluation's ``train_seconds``, which includes injecting the adapter). Memory is sampled every 20 ms
from outside the process (psutil): peak RSS and peak USS (memory only that process holds; shared
object-store pages excluded). On a GPU, peak allocated GPU memory per trial is reported too.
``--resume-check`` (GPU): a tiny two-stage run on the GPU is killed mid-stage and resumed; its
genomes, losses and weights must equal an uninterrupted run's. Without a GPU, ``--device cuda``
says so and exits 0. Writes <out>/real_models.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

MB = 1024 * 1024
HP = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
      "learning_rate": 1e-4, "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0}


def load_base(model: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if model == "llama100m":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()


def batches(vocab: int, n: int, block: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(n, block)).astype(np.int32)


class MemorySampler:
    """Peak RSS / USS of a process, sampled from outside every 20 ms."""

    def __init__(self, pid: int):
        self.process, self.rss, self.uss, self.stop = psutil.Process(pid), 0.0, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                info = self.process.memory_full_info()
            except psutil.Error:
                break
            self.rss, self.uss = max(self.rss, info.rss / MB), max(self.uss, info.uss / MB)
            time.sleep(0.02)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_rss_mb": round(self.rss, 1), "peak_uss_mb": round(self.uss, 1)}


# ----- the raw loop, in a process of its own -----------------------------------------------------
def raw_loop(args) -> dict:
    from peft import get_peft_model

    from evolm.genome import lora_config

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = load_base(args.model, dtype_of(args)).to(device)
    data = torch.from_numpy(batches(base.config.vocab_size, args.steps * args.batch, args.block).astype(np.int64))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = get_peft_model(base, lora_config(HP | {"max_steps": args.steps, "per_device_train_batch_size": args.batch}))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=HP["learning_rate"])
    model.train()
    for step in range(args.steps):
        x = data[step * args.batch:(step + 1) * args.batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HP["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"train_seconds": seconds, "tokens": args.steps * args.batch * args.block, "last_loss": loss.item()}
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    return out


def dtype_of(args) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]


def run_raw(args) -> dict:
    cmd = [sys.executable, __file__, "--raw-child", "--model", args.model, "--device", args.device, "--steps",
           str(args.steps), "--batch", str(args.batch), "--block", str(args.block), "--threads", str(args.threads),
           "--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = MemorySampler(proc.pid)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"raw loop failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]) | sampler.done()


# ----- evolm's path: one Ray worker -----------------------------------------------------------------
def run_evolm(args) -> dict:
    import ray

    from evolm.rayconfig import RayConfig
    from evolm.executor import EvalRequest, RayExecutor, StagePayload
    from evolm.genome import hyperparameters
    from evolm.models import ModelPayload

    base = load_base(args.model, dtype_of(args))
    data = batches(base.config.vocab_size, args.steps * args.batch, args.block)
    training = HP | {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "eval_batch_size": args.batch,
                     "eval_max_batches": 1}
    payload = StagePayload("bench", ModelPayload.of(base), {"train": data, "validation": data[: args.batch]}, training)
    del base  # the driver keeps only the payload, as evolm's driver keeps its base
    executor = RayExecutor(RayConfig(num_workers=1, num_cpus_per_trial=args.threads,
                                     num_gpus_per_trial=1 if args.device == "cuda" else 0))
    try:
        executor.set_stage(payload)
        pid = ray.get(executor.actors[0].__ray_call__.remote(lambda self: os.getpid()))
        sampler = MemorySampler(pid)
        results = []
        executor.map([EvalRequest("g0", hyperparameters({}, training), 1)], results.append)
        memory = sampler.done()
    finally:
        executor.close()
        ray.shutdown()
    r = results[0]
    if r["status"] != "ok":
        raise SystemExit(f"evolm's evaluation failed: {r.get('error')}")
    out = {"train_seconds": r["train_seconds"], "evaluation_seconds": r["seconds"],
           "tokens": args.steps * args.batch * args.block, "last_loss": r["curve"]["last"]} | memory
    if r.get("gpu_peak_mb") is not None:
        out["gpu_peak_mb"] = r["gpu_peak_mb"]
    return out


def sizes(args) -> dict:
    base = load_base(args.model, dtype_of(args))
    n = sum(p.numel() for p in base.parameters())
    return {"parameters": n, "base_mb": sum(p.numel() * p.element_size() for p in base.parameters()) / MB}


# ----- resume on a GPU -----------------------------------------------------------------------------
def resume_check(args) -> dict:
    """A tiny run on the GPU, killed mid-stage and resumed, against an uninterrupted one."""
    import tempfile

    import yaml

    from tests.conftest import _load_prepare, tiny_experiment
    from tests.test_resume import kill_when, run_to_end

    tmp = Path(tempfile.mkdtemp(prefix="evolm-gpu-"))
    corpora = tmp / "corpora"
    _load_prepare().prepare(corpora, max_bytes=60_000, seed=0)
    raw = tiny_experiment(corpora, tmp / "results")
    raw["ray"] = {"num_workers": 1, "num_gpus_per_trial": 1}
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 20, "high": 40}
    path = tmp / "gpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_to_end("run", path, "--name", "whole", "--no-ray")
    cut = tmp / "results" / "cut"
    killed = kill_when(("run", path, "--name", "cut", "--no-ray"), lambda: (cut / "checkpoints" / "s002-g0000.json").exists())
    run_to_end("resume", cut, "--no-ray")
    from safetensors.torch import load_file

    def outcome(d):
        evals = sorted(json.dumps([r["stage"], r["generation"], r["genome_id"], r["objectives"], r["device"]])
                       for r in map(json.loads, (d / "evaluations.jsonl").read_text().splitlines()))
        return evals, load_file(str(d / "models" / "stage-2" / "model.safetensors"))

    (we, ww), (ce, cw) = outcome(tmp / "results" / "whole"), outcome(cut)
    same = we == ce and all(torch.equal(ww[k], cw[k]) for k in ww)
    return {"killed_mid_run": killed, "identical_after_resume": same, "devices": sorted({json.loads(e)[4] for e in we})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama100m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume-check", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench-real-models"))
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.raw_child:
        print(json.dumps(raw_loop(args)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): the GPU check was not run")
        return 0
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("raw_child", "out")} | {"out": str(args.out)},
              "sizes": sizes(args), "raw": run_raw(args), "evolm": run_evolm(args)}
    raw, ev = result["raw"], result["evolm"]
    result["throughput_ratio"] = (ev["tokens"] / ev["train_seconds"]) / (raw["tokens"] / raw["train_seconds"])
    result["peak_uss_ratio"] = ev["peak_uss_mb"] / raw["peak_uss_mb"]
    if args.resume_check and args.device == "cuda":
        result["resume"] = resume_check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_models.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
