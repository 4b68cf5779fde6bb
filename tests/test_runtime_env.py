"""ray.runtime_env: what a node needs beyond Ray and torch comes with the run.

A real two-node cluster on this machine whose second node runs a Python that cannot import evolm
(this venv's packages, without the hook of evolm's editable install): with ``ship_evolm`` the run
works there and equals a one-process run; without it the run stops with one clear line. Env vars
and a working_dir reach the workers of a Ray started before evolm (given per worker); a pip
requirement the nodes cannot install stops the run with one line, nothing recorded as failed.
"""
import os
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest

import evolm
from evolm.jsonfiles import read_jsonl
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.errors import ClusterError, ConfigError
from evolm.executor import LocalExecutor, RayExecutor, _environment_problem
from tests.conftest import shut_down_cluster, tiny_experiment, write_experiment

EVOLM_DIR = str(Path(evolm.__file__).resolve().parent)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")


def evolm_cli(*args, cwd: Path, timeout=600):
    """The CLI from a folder without evolm in it (Ray puts the driver's folder on the workers' path)."""
    return subprocess.run([sys.executable, "-m", "evolm.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def python_without_evolm(tmp_path_factory) -> Path:
    """A Python with this venv's packages (Ray, torch, transformers, ...) but not evolm: a virtualenv
    whose .pth names the venv's site-packages as a plain path, so the .pth files there (evolm's
    editable-install hook among them) are not run."""
    root = tmp_path_factory.mktemp("py-without-evolm")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_venv_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    probe = "import ray, torch, transformers\ntry:\n import evolm\nexcept ImportError:\n print('no evolm')"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=_env(), cwd=root)
    assert done.stdout.strip() == "no evolm", done.stdout + done.stderr
    return python


@pytest.fixture
def cluster_with_a_node_without_evolm(python_without_evolm, tmp_path):
    """A head (this Python, 1 CPU) and a second node started by ``ray start`` in the Python without evolm."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    log = tmp_path / "node2.log"
    node = subprocess.Popen([str(python_without_evolm), "-m", "ray.scripts.scripts", "start", "--address",
                             cluster.address, "--num-cpus", "1", "--block", "--disable-usage-stats"],
                            cwd=python_without_evolm.parent, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text() and node.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "Ray runtime started" in log.read_text(), log.read_text()[-3000:]
        yield cluster
    finally:
        node.terminate()  # ``ray start --block`` stops the node's processes when it is told to stop
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        shut_down_cluster(cluster)


def _key(r):
    return r["stage"], r["generation"], r["genome_id"], r["status"], (r["objectives"] or {}).get("val_loss")


def test_ship_evolm_lets_a_node_without_evolm_evaluate(corpora, tmp_path, cluster_with_a_node_without_evolm):
    address = cluster_with_a_node_without_evolm.address
    raw = tiny_experiment(corpora, tmp_path / "results")

    # Without the runtime_env, the second node's worker cannot even load its class: one line, exit 2.
    failed = evolm_cli("run", write_experiment(tmp_path / "bare.yaml", raw), "--name", "bare",
                       "--ray-address", address, "--workers", "2", cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: a Ray worker") and "cannot import evolm" in line and "ship_evolm: true" in line
    ledger = tmp_path / "results" / "bare" / "evaluations.jsonl"
    assert all(r["status"] == "ok" for r in (read_jsonl(ledger) if ledger.exists() else []))  # none recorded as failed

    # With ship_evolm the driver's evolm goes to both nodes; the run equals a one-process run.
    raw["ray"]["runtime_env"] = {"ship_evolm": True}
    done = evolm_cli("run", write_experiment(tmp_path / "shipped.yaml", raw), "--name", "shipped",
                     "--ray-address", address, "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    on_cluster = read_jsonl(tmp_path / "results" / "shipped" / "evaluations.jsonl")
    assert len({r["node"] for r in on_cluster if not r["cached"]}) == 2  # both nodes evaluated genomes

    ContinualRun(parse_config(raw), tmp_path / "local", lambda: LocalExecutor(threads=1)).run()
    local = read_jsonl(tmp_path / "local" / "evaluations.jsonl")
    assert sorted(map(_key, on_cluster)) == sorted(map(_key, local))


def test_env_vars_and_working_dir_reach_the_workers_of_a_running_ray(corpora, tmp_path, ray_session):
    """Ray was started before evolm (the tests' session): the runtime_env goes with each worker."""
    assert "EVOLM_TEST_PROBE" not in os.environ
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "probe.txt").write_text("5")

    def env_probe(ctx):  # defined here, so Ray ships it by value
        return float(os.environ["EVOLM_TEST_PROBE"])

    def dir_probe(ctx):  # a worker's current directory is the working_dir
        return float(Path("probe.txt").read_text())

    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["stages"] = raw["stages"][:1]
    raw["search"].update(population_size=2, offspring_size=2, generations=0,
                         objectives=["val_loss", "env_probe_rt", "dir_probe_rt"])
    raw["ray"]["runtime_env"] = {"env_vars": {"EVOLM_TEST_PROBE": "3"}, "working_dir": "workdir"}
    for name, fn in (("env_probe_rt", env_probe), ("dir_probe_rt", dir_probe)):
        evolm.OBJECTIVES.register(name, fn)
    try:
        config = parse_config(raw, base_dir=tmp_path)  # working_dir relative to the experiment's folder
        assert config.ray.runtime_env.working_dir == str(workdir)
        evolm.run(config, tmp_path / "run", executor="ray")
    finally:
        for name in ("env_probe_rt", "dir_probe_rt"):
            evolm.OBJECTIVES._entries.pop(name, None)
    records = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    assert records and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert {(r["objectives"]["env_probe_rt"], r["objectives"]["dir_probe_rt"]) for r in records} == {(3.0, 5.0)}


def test_a_runtime_env_the_nodes_cannot_set_up_stops_the_run_in_one_line(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["model"]["pretrain"]["max_steps"] = 2
    raw["ray"]["runtime_env"] = {"pip": [str(tmp_path / "no-such-package")]}  # pip fails without the index
    done = evolm_cli("run", write_experiment(tmp_path / "pip.yaml", raw), "--name", "pip", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: Ray cannot set up ray.runtime_env on a node") and "no-such-package" in line, line
    ledger = tmp_path / "results" / "pip" / "evaluations.jsonl"
    assert not ledger.exists() or read_jsonl(ledger) == []  # no evaluation recorded as failed

    raw["ray"]["runtime_env"] = {"working_dir": str(tmp_path / "missing")}
    done = evolm_cli("run", write_experiment(tmp_path / "wd.yaml", raw), "--name", "wd", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "ray.runtime_env.working_dir: not found" in done.stderr and "fix the path" in done.stderr


@pytest.mark.parametrize("runtime_env, hint", [
    ({"working_dir": "nowhere"}, "ray.runtime_env.working_dir: not found"),
    ({"working_dir": "notes.txt"}, "Ray ships a directory or a .zip"),
    ({"working_dir": "s3://bucket/code"}, "a remote working_dir must be an archive"),
    ({"py_modules": ["ftp://host/pkg.zip"]}, "ray.runtime_env.py_modules: ftp://host/pkg.zip: Ray cannot fetch ftp://"),
    ({"py_modules": ["notes.txt"]}, "Ray ships a directory or a .py / .whl file"),
    ({"env_vars": {"THREADS": 4}}, "THREADS: values must be strings; quote it"),
    ({"env_vars": {"A=B": "1"}}, "not an environment variable name"),
    ({"pip": ["peft\ntorch"]}, "one non-empty requirement per entry"),
    ({"ship_evolm": True, "py_modules": ["other/evolm"]}, "keep one"),
    ({"conda": "env"}, "ray.runtime_env.conda: unknown key"),
])
def test_runtime_env_mistakes_name_the_field(corpora, tmp_path, runtime_env, hint):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "other" / "evolm").mkdir(parents=True)
    raw = tiny_experiment(corpora, tmp_path)
    raw["ray"]["runtime_env"] = runtime_env
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=tmp_path)
    assert hint in str(info.value)


def test_runtime_env_as_ray_gets_it(corpora, tmp_path, ray_init_calls):
    """What evolm hands to ray.init (seen by a stand-in for it) when it starts or joins Ray."""
    (tmp_path / "code").mkdir()
    raw = tiny_experiment(corpora, tmp_path)
    assert parse_config(raw).ray.runtime_env.as_ray() is None  # nothing set: Ray's default
    raw["ray"]["runtime_env"] = {"working_dir": "code", "py_modules": ["code"], "pip": ["peft==0.13.2"],
                                 "env_vars": {"A": "1"}, "ship_evolm": True}
    cfg = parse_config(raw, base_dir=tmp_path).ray
    expected = {"working_dir": str(tmp_path / "code"), "py_modules": [str(tmp_path / "code"), EVOLM_DIR],
                "pip": ["peft==0.13.2"], "env_vars": {"A": "1"}}
    assert cfg.runtime_env.as_ray() == expected
    asked = ray_init_calls
    for address in (None, "10.0.0.1:6379"):
        with pytest.raises(ClusterError, match="check ray.address / --ray-address and ray.runtime_env"):
            RayExecutor(cfg, address=address)
    assert [a["runtime_env"] for a in asked] == [expected, expected]


def test_a_missing_dependency_names_the_pip_line():
    import ray
    import transformers

    exc = ray.exceptions.RayActorError(error_msg="The actor died because of an error raised in its creation task, "
                                       "ray::_RayWorker.__init__() (pid=1, ip=10.0.0.2)\nModuleNotFoundError: "
                                       "No module named 'transformers'")
    problem = str(_environment_problem(ray, exc))
    assert "on 10.0.0.2 cannot import transformers" in problem
    assert f"'transformers=={transformers.__version__}' to ray.runtime_env.pip" in problem
    assert _environment_problem(ray, ray.exceptions.RayActorError(error_msg="killed by OOM")) is None


def test_the_readme_runtime_env_example_is_valid(corpora, tmp_path):
    import yaml

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("#### Nodes without evolm"):]
    block = section[section.index("```yaml") + len("```yaml"): section.index("```", section.index("```yaml") + 7)]
    (tmp_path / "mycode").mkdir()
    (tmp_path / "mypkg").mkdir()
    raw = tiny_experiment(corpora, tmp_path)
    raw["ray"] = yaml.safe_load(block)["ray"]
    env = parse_config(raw, base_dir=tmp_path).ray.runtime_env.as_ray()
    assert env["py_modules"] == [str(tmp_path / "mypkg"), EVOLM_DIR] and env["working_dir"] == str(tmp_path / "mycode")
