"""Security: evolm's local Ray listens on loopback only, and no name from the command line or from a
run directory's files (edited or tampered with) leads a read or a write out of the run directory."""
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import evolm
from evolm.checkpoint import latest_checkpoint
from evolm.cli import main
from evolm.errors import RunDirError
from evolm.ledger import StageLedger
from tests.conftest import ROOT, tiny_experiment, write_experiment

# ----- Ray on loopback --------------------------------------------------------------------------

LISTENING = """
import json, sys, psutil, ray
from ray._private import ray_constants
from evolm.executor import RayExecutor
from evolm.rayconfig import RayConfig

executor = RayExecutor(RayConfig(num_workers=1, dashboard=sys.argv[1] == "dashboard"))
ray.get([actor.__ray_ready__.remote() for actor in executor.actors])  # a worker process is up too
me = psutil.Process()
found = []
for p in [me, *me.children(recursive=True)]:
    try:
        found += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps({"listening": found, "clusters_switch_restored": ray_constants.ENABLE_RAY_CLUSTER}))
executor.close()
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.parametrize("dashboard", ["no dashboard", "dashboard"])
def test_a_local_ray_listens_on_loopback_only(dashboard):
    """Every listening socket of the driver and of every process Ray started (GCS, raylet, agents,
    the dashboard, a worker) is bound to loopback: nothing on 0.0.0.0, :: or the host's address."""
    done = subprocess.run([sys.executable, "-c", LISTENING, dashboard], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    processes = {name for name, _, _ in seen["listening"]}
    assert {"gcs_server", "raylet", "ray::_RayWorker"} <= processes, processes
    assert [s for s in seen["listening"] if not _loopback(s[1])] == []
    assert (8265 in {port for _, _, port in seen["listening"]}) == (dashboard == "dashboard")
    assert seen["clusters_switch_restored"] is True  # joining a real cluster later is unaffected


# ----- names and paths --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../escaped", "a/b", "/tmp/elsewhere", "a\\b", "", " x"])
def test_run_names_stay_inside_the_output_folder(corpora, tmp_path, name, capsys):
    out = tmp_path / "inside" / "results"
    exp = write_experiment(tmp_path / "exp.yaml", tiny_experiment(corpora, out))
    with pytest.raises(RunDirError, match="must be a single folder name"):
        evolm.api.new_run_dir(evolm.api.as_config(exp), name)
    assert main(["run", str(exp), "--name", name, "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --name ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["exp.yaml"]  # nothing written, anywhere


def test_a_plain_run_name_is_accepted(corpora, tmp_path):
    config = evolm.api.as_config(tiny_experiment(corpora, tmp_path / "results"))
    assert evolm.api.new_run_dir(config, "my-run.2") == tmp_path / "results" / "my-run.2"


@pytest.fixture(scope="module")
def finished_run(corpora, tmp_path_factory):
    from tests.tiny_runs import make_tiny_run

    return make_tiny_run(corpora, tmp_path_factory.mktemp("security") / "tiny")


def _copy(run_dir, into):
    return shutil.copytree(run_dir, into)


def _rewrite_checkpoint(path, change):
    """Edit a checkpoint's state and fix its checksum, as someone tampering with it would."""
    state = json.loads(path.read_text())["state"]
    change(state)
    body = json.dumps(state, sort_keys=True)
    path.write_text(json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "state": state}))


@pytest.mark.parametrize("base_model", ["../../outside", "/etc", "models/stage-1/../../../x", 7, None])
def test_a_checkpoint_whose_base_model_leaves_the_run_is_refused(finished_run, tmp_path, base_model, capsys):
    run_dir = _copy(finished_run, tmp_path / "run")
    newest = run_dir / "checkpoints" / "s002-end.json"
    _rewrite_checkpoint(newest, lambda s: s.update(base_model=base_model))
    with pytest.raises(RunDirError, match=re.escape(f"{newest}: base_model {base_model!r} is not models/stage-<k>")):
        latest_checkpoint(run_dir)
    for command in ("resume", "status"):
        assert main([command, str(run_dir), "--no-ray"] if command == "resume" else [command, str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {newest}: base_model") and err.count("\n") == 1


@pytest.mark.parametrize("where", ["population", "hall_of_fame"])
def test_a_checkpoint_genome_id_that_is_a_path_is_refused(finished_run, tmp_path, where):
    run_dir = _copy(finished_run, tmp_path / "run")
    newest = run_dir / "checkpoints" / "s002-end.json"
    _rewrite_checkpoint(newest, lambda s: s[where][0].update(id="../../../../tmp/owned"))
    with pytest.raises(RunDirError, match=re.escape(f"{newest}: genome id '../../../../tmp/owned' is not a plain name")):
        latest_checkpoint(run_dir)


@pytest.mark.parametrize("log,key", [("evaluations.jsonl", "genome_id"), ("evaluations.jsonl", "result_of"),
                                     ("rungs.jsonl", "genome_id")])
def test_a_ledger_genome_id_that_is_a_path_is_refused(finished_run, tmp_path, log, key):
    """A resumed run trains, loads and deletes adapters by these ids: a path among them is refused,
    naming the file, before anything is read or written through it."""
    run_dir = _copy(finished_run, tmp_path / "run")
    record = json.loads((run_dir / "evaluations.jsonl").read_text().splitlines()[0])
    if log == "rungs.jsonl":
        record = {"stage": record["stage"], "generation": 0, "rung": 0, "status": "ok"}
    record[key] = "../../models/stage-0/model"
    with open(run_dir / log, "a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(RunDirError, match=re.escape(f"{run_dir / log}: genome id '../../models/stage-0/model' is not a plain")):
        StageLedger.read(run_dir, record["stage"])
    with pytest.raises(RunDirError, match="is not a plain name"):
        StageLedger(run_dir, 1).adapter_path("../x")

