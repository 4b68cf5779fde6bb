"""Where evaluations run: in-process (``LocalExecutor``) or on Ray workers (``RayExecutor``).

Both take the stage once (``set_stage``) and then ``map`` evaluation requests, calling back as
each result arrives; a callback may return more requests, which join the queue (the steady-state
search hands a freed worker its next child this way). Only this module imports Ray. A failing evaluation is data, not a crash:
the result says ``status: failed`` with the error, and the search gives it the worst fitness.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from evolm.diskfull import no_space
from evolm.rayconfig import RayConfig
from evolm.errors import ClusterError
from evolm.failures import failure_record as _failure
from evolm.models import ModelPayload
from evolm.objectives import non_finite_error
from evolm.registry import EXECUTORS
from evolm.train import evaluate_genome, pick_device

log = logging.getLogger(__name__)
@dataclass
class EvalRequest:
    genome_id: str
    hp: dict
    seed: int
    stop_at: int | None = None
    """Pause after this many steps (a rung of successive halving); None: train ``max_steps``."""
    resume: dict | None = None
    """The training state a paused evaluation returned: train on from there."""
    inherit: dict | None = None
    """``{"adapter": arrays, "hp": parent hyperparameters}``: start from the parent's adapter."""


@dataclass
class StagePayload:
    """What every worker needs for a stage: the base model, the token blocks, evaluation settings."""

    key: str
    model: ModelPayload
    blocks: dict
    training: dict
    objectives: list = field(default_factory=list)
    """``evolm.objectives.Objective`` objects to measure besides the built-in ones (run on the worker)."""
    subspaces: dict = field(default_factory=dict)
    """Earlier stages' update subspaces, for the ``orthogonality`` gene (``evolm.interference``)."""
    tokenizer: object = None
    validation: list = field(default_factory=list)
    """The stage's validation examples as read (capped by ``training.eval_max_examples``), for user objectives."""


class _StageRunner:
    """Holds one stage's base model in a process and runs requests against it."""

    def __init__(self, threads: int, use_gpu: bool):
        self.threads = threads
        self.device = pick_device(use_gpu)
        self.key, self.model, self.stage = None, None, None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.node = socket.gethostname()

    def load(self, stage: StagePayload) -> None:
        if stage.key != self.key:  # the base model is built once per stage per worker
            self.model, self.stage, self.key = stage.model.build().to(self.device), stage, stage.key

    def run(self, request: EvalRequest) -> dict:
        torch.set_num_threads(self.threads)  # results depend on the thread count: fix it per trial
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            result = evaluate_genome(self.model, self.stage.blocks, request.hp, request.seed,
                                     self.stage.training, self.device, request.resume, request.stop_at,
                                     request.inherit, self.stage.objectives, self.stage.subspaces,
                                     self.stage.tokenizer, self.stage.validation)
            error = non_finite_error(result["objectives"])
            if error:
                result.update(status="failed", error=error, adapter=None, state=None)
            else:
                result["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure of one genome is recorded, not raised
            if no_space(exc):  # the machine's disk, not the genome: the run stops and is resumed
                raise
            if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()
            result = {"status": "failed", **_failure(exc), "objectives": {}, "adapter": None}
        result.update(genome_id=request.genome_id, seconds=time.perf_counter() - start, worker=self.worker,
                      device=str(self.device), dtype=str(self.model.dtype).removeprefix("torch.") if self.model else None,
                      node=self.node)
        if self.device.type == "cuda":
            result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return result


class LocalExecutor:
    """Evaluations one after another in this process (tests, debugging, ``--no-ray``)."""

    def __init__(self, threads: int = 1, use_gpu: bool = False):
        self.runner = _StageRunner(threads, use_gpu)
        self.workers = 1

    def set_stage(self, stage: StagePayload) -> None:
        self.runner.load(stage)

    def map(self, requests: list[EvalRequest], on_result: Callable[[dict], list | None]) -> None:
        threads, queue = torch.get_num_threads(), collections.deque(requests)
        try:
            while queue:
                result = self.runner.run(queue.popleft())
                torch.set_num_threads(threads)  # the caller's own work keeps its thread count
                queue.extend(on_result(result) or ())
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass


def _actor_runtime_env(ray, env: dict | None) -> dict | None:
    """``ray.runtime_env`` for ``.options(runtime_env=...)`` of each worker, for a Ray that was
    running before evolm (so ``ray.init`` took none from it). Ray takes local working_dir /
    py_modules paths only in ``ray.init``: they are uploaded here with Ray's own helpers, as
    ``ray.init`` does."""
    if not env or not {"working_dir", "py_modules"} & env.keys():
        return env
    import inspect
    import tempfile

    env = dict(env)
    try:
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
            extra = ({"include_gitignore": os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"}
                     if "include_gitignore" in inspect.signature(upload).parameters else {})
            with tempfile.TemporaryDirectory(prefix="evolm-runtime-env-") as scratch:
                env = upload(env, scratch_dir=scratch, logger=log, **extra)
    except (ImportError, AttributeError, TypeError) as exc:  # this Ray has no such helpers
        log.warning("ray.runtime_env: working_dir and py_modules are not applied (%s): Ray was started before "
                    "evolm and this Ray version cannot take local paths per worker; give them to ray.init", exc)
        return {k: v for k, v in env.items() if k not in ("working_dir", "py_modules")} or None
    except (ray.exceptions.RuntimeEnvSetupError, ValueError, OSError) as exc:
        raise ClusterError(f"cannot upload ray.runtime_env to Ray: {_gist(str(exc))}; "
                           f"fix ray.runtime_env.working_dir / py_modules") from None
    log.info("Ray was running before evolm: ray.runtime_env is given to each worker")
    return env


def _gist(text: str, limit: int = 600) -> str:
    """One line out of a long Ray message: pip's own ERROR line, else the last exception line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    pick = ([line for line in lines if line.startswith("ERROR:")]
            or [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)] or lines or [""])[-1]
    node = re.search(r"\[Node ([^\]]+)\]", text)
    pick = f"{pick} (node {node.group(1)})" if node else pick
    return pick if len(pick) <= limit else pick[:limit] + " ..."


def _environment_problem(ray, exc: BaseException) -> ClusterError | None:
    """A worker that cannot start where Ray placed it (its runtime_env cannot be set up there, or it
    cannot import evolm or a module evolm needs): a problem of the cluster to fix, not a failure of
    the genome, and the same for every evaluation sent there."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, ray.exceptions.RuntimeEnvSetupError):
        return ClusterError(f"Ray cannot set up ray.runtime_env on a node: {_gist(text)}; fix ray.runtime_env "
                            f"(pip requirements the nodes can install, paths that exist) and resume the run")
    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing is None or not isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        return None
    module, where = missing.group(1), re.search(r"\bip=([0-9A-Fa-f.:]+)", text)
    where = f" on {where.group(1)}" if where else ""
    top = module.split(".")[0]
    if top == "evolm":
        fix = "set ray.runtime_env.ship_evolm: true, or install evolm on every node"
    else:
        import importlib.metadata

        dists = importlib.metadata.packages_distributions().get(top) or []
        try:
            pin = f"'{dists[0]}=={importlib.metadata.version(dists[0])}'" if dists else f"'{top}'"
        except importlib.metadata.PackageNotFoundError:
            pin = f"'{dists[0]}'"
        fix = f"add {pin} to ray.runtime_env.pip (or ray.runtime_env.py_modules), or install it on every node"
    return ClusterError(f"a Ray worker{where} cannot import {module} (No module named '{module}'): {fix}; "
                        f"then resume the run")


def _unavailable(ray) -> type | tuple:
    """Ray's error for a worker it cannot reach (its node lost); an older Ray may have none."""
    return getattr(ray.exceptions, "ActorUnavailableError", ())


@contextlib.contextmanager
def _loopback_node():
    """A local cluster whose node IP is 127.0.0.1, so that every Ray server (GCS, raylet, object
    manager, workers, agents, metrics) listens on loopback only. Ray 2.60 turns a loopback
    ``_node_ip_address`` into the host's own address and then binds to all interfaces; the node IP
    is loopback only where Ray clusters are switched off (``ENABLE_RAY_CLUSTER``, its macOS/Windows
    default), so it is switched off while this cluster starts."""
    try:
        from ray._private import ray_constants as constants
    except ImportError:
        constants = None
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray version has no ENABLE_RAY_CLUSTER: its local cluster may listen on every interface")
        yield
        return
    saved, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


class RayExecutor:
    """Evaluations spread over Ray actors, one per concurrent trial, on a local or joined cluster."""

    def __init__(self, cfg: RayConfig, address: str | None = None, workers: int | None = None):
        import ray

        self.ray = ray
        self.cfg, self.workers = cfg, workers or cfg.num_workers
        address = address or cfg.address
        runtime_env, actor_env = cfg.runtime_env.as_ray(), None
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
                else:
                    # address="local": a new cluster of our own, even if another Ray runs on this machine
                    # GPUs as torch sees them: declaring more would let trials wait for GPUs that do not exist
                    with _loopback_node():
                        ray.init(address="local", num_cpus=math.ceil(self.workers * cfg.num_cpus_per_trial),
                                 num_gpus=torch.cuda.device_count(), include_dashboard=cfg.dashboard,
                                 dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=False,
                                 configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RuntimeEnvSetupError) as exc:
                raise ClusterError(f"cannot start or join Ray (address={address or 'local'}): {_gist(str(exc))}; "
                                   f"check ray.address / --ray-address"
                                   + (" and ray.runtime_env" if runtime_env else "")) from None
        else:  # a Ray started before evolm (a library user's, the tests'): the env goes with each worker
            actor_env = _actor_runtime_env(ray, runtime_env)
        gpus = ray.cluster_resources().get("GPU", 0)
        if cfg.num_gpus_per_trial > gpus:  # its workers would wait forever for a GPU
            raise ClusterError(f"ray.num_gpus_per_trial is {cfg.num_gpus_per_trial:g} but the Ray cluster has "
                               f"{gpus:g} GPU(s); set it to 0 (CPU) or add GPU nodes")
        threads = max(1, int(cfg.num_cpus_per_trial))
        worker_cls = ray.remote(_RayWorker).options(
            num_cpus=cfg.num_cpus_per_trial, num_gpus=cfg.num_gpus_per_trial,
            max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries,
            **({"runtime_env": actor_env} if actor_env else {}))
        self.actors = [worker_cls.remote(threads, cfg.num_gpus_per_trial > 0) for _ in range(self.workers)]
        self.stage_ref = None
        self.restarting = {}
        """ready ref -> actor: a worker that became unreachable (its node lost), given work again once Ray
        has restarted it; it may never come back (no room left on the other nodes)."""

    def set_stage(self, stage: StagePayload) -> None:
        # One object in the store per stage; each worker fetches it once, when the key changes.
        self.stage_key, self.stage_ref = stage.key, self.ray.put(stage)

    def map(self, requests: list[EvalRequest], on_result: Callable[[dict], list | None]) -> None:
        ray = self.ray
        pending, running, lost = collections.deque(requests), {}, {}
        idle = [a for a in self.actors if all(a is not b for b in self.restarting.values())]
        warned = False
        while pending or running:
            while pending and idle:
                actor, request = idle.pop(), pending.popleft()
                # The stage ref is wrapped in a list so Ray does not fetch it for every call.
                running[actor.run.remote(self.stage_key, [self.stage_ref], request)] = (actor, request)
            if not running and not warned:
                warned = True
                log.warning("every Ray worker is lost (a node went away): waiting for Ray to restart one on "
                            "a node with room (Ctrl-C stops the run; evolm resume continues it)")
            try:
                done, _ = ray.wait(list(running) + list(self.restarting), num_returns=1)
            except ray.exceptions.RaySystemError as exc:
                raise ClusterError(f"lost the Ray cluster: {exc}; resume the run when it is back") from None
            for ref in done:
                if ref in self.restarting:
                    self._restarted(ref, idle)
                    continue
                actor, request = running.pop(ref)
                try:
                    result = self._result(ref, request, lost.get(id(request), 0) < self.cfg.max_retries)
                except _unavailable(ray):
                    # The worker's node was lost mid-evaluation (or before it started it). Ray (2.60)
                    # spends its max_task_retries within a second on the unreachable address, before it
                    # knows the node is dead, and then gives up ("the task may or may not have been
                    # executed"); the actor it restarts needs room on another node, which may not be
                    # there. Recording "worker died" would fail a genome for the cluster's loss: send the
                    # evaluation again to the next free worker (it fixes its seed and threads, so the
                    # result is the same), and give that actor work again only once it answers.
                    lost[id(request)] = lost.get(id(request), 0) + 1
                    log.warning("a Ray worker became unreachable evaluating %s (its node lost?): evaluating it "
                                "again on the next free worker", request.genome_id)
                    pending.appendleft(request)
                    self.restarting[actor.__ray_ready__.remote()] = actor
                    continue
                pending.extend(on_result(result) or ())
                if not (result.get("error") or "").startswith("worker died"):
                    idle.append(actor)
                    continue
                self._drop(actor)

    def _restarted(self, ref, idle: list) -> None:
        """A lost worker's readiness answered: back to work, or gone for good (out of restarts)."""
        ray, actor = self.ray, self.restarting.pop(ref)
        try:
            ray.get(ref)
        except _unavailable(ray):  # still unreachable (Ray has not yet seen the node die)
            time.sleep(0.5)  # ask again, not in a busy loop
            self.restarting[actor.__ray_ready__.remote()] = actor
        except ray.exceptions.RayActorError:
            self._drop(actor)
        else:
            idle.append(actor)

    def _drop(self, actor) -> None:
        self.actors.remove(actor)  # out of restarts: give it no more work
        if not self.actors:
            raise ClusterError("every Ray worker died (see evaluations.jsonl); resume the run "
                               "once the cause (memory, a lost node) is fixed")

    def _result(self, ref, request: EvalRequest, retry_unreachable: bool = False) -> dict:
        ray = self.ray
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.RuntimeEnvSetupError) as exc:
            if retry_unreachable and isinstance(exc, _unavailable(ray)):
                raise  # the caller sends the evaluation again
            problem = _environment_problem(ray, exc)
            if problem is not None:  # the worker cannot run here at all: stop, nothing recorded as failed
                raise problem from None
            # the worker died more often than max_retries, or failed outside the evaluation
            failure = {"error": f"worker died: {str(exc).splitlines()[0]}"}
            if isinstance(exc, ray.exceptions.RayTaskError):  # record the worker's exception, not Ray's wrapper
                cause = exc
                while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(cause.cause, BaseException):
                    cause = cause.cause
                if no_space(cause):  # a worker's disk filled up: stop, nothing recorded as failed
                    raise cause from None
                failure = _failure(cause, re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
                failure["error"] = f"worker failed: {failure['error']}"
            return {"status": "failed", **failure, "objectives": {},
                    "adapter": None, "genome_id": request.genome_id, "seconds": 0.0, "worker": None}

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class _RayWorker:
    def __init__(self, threads: int, use_gpu: bool):
        self.runner = _StageRunner(threads, use_gpu)
        self.runner.node = self._ray().get_runtime_context().get_node_id()[:12]  # several nodes may share a host

    def run(self, stage_key: str, stage_ref: list, request: EvalRequest) -> dict:
        if stage_key != self.runner.key:
            start = time.perf_counter()
            try:
                self.runner.load(self._ray().get(stage_ref[0]))
            except Exception as exc:  # noqa: BLE001 - recorded here, where the exception chain is whole
                failure = _failure(exc)
                return {"status": "failed", "error": f"loading the stage failed: {failure['error']}",
                        "traceback": failure["traceback"], "objectives": {}, "adapter": None,
                        "genome_id": request.genome_id, "seconds": time.perf_counter() - start,
                        "worker": self.runner.worker, "node": self.runner.node}
        return self.runner.run(request)

    @staticmethod
    def _ray():
        import ray

        return ray


# An executor factory: (RayConfig, address) -> an object with set_stage, map, close and ``workers``.
def require_local_gpus(cfg: RayConfig) -> None:
    """GPUs asked for trials that run on this machine must be here (a joined cluster has its own)."""
    if cfg.num_gpus_per_trial > 0 and not torch.cuda.is_available():
        raise ClusterError(f"ray.num_gpus_per_trial is {cfg.num_gpus_per_trial:g} but this machine has no GPU "
                           f"(torch.cuda.is_available() is False); set it to 0")


def _local_executor(cfg: RayConfig, address=None) -> LocalExecutor:
    require_local_gpus(cfg)
    return LocalExecutor(threads=max(1, int(cfg.num_cpus_per_trial)), use_gpu=cfg.num_gpus_per_trial > 0)


EXECUTORS.register("local", _local_executor)
EXECUTORS.register("ray", lambda cfg, address=None: RayExecutor(cfg, address=address, workers=cfg.num_workers))
