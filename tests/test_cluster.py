"""Many nodes: a real two-node Ray cluster on this machine (a head plus a second node with its own
resources); evaluations run on both nodes and the results equal a one-process run."""
import os
import subprocess
import sys

import pytest

from evolm.jsonfiles import read_jsonl
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor
from tests.conftest import ROOT, shut_down_cluster, tiny_experiment, write_experiment


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    yield cluster
    shut_down_cluster(cluster)


def test_evaluations_spread_over_two_nodes_with_identical_results(corpora, tmp_path, two_node_cluster):
    raw = tiny_experiment(corpora, tmp_path / "results")
    exp = write_experiment(tmp_path / "exp.yaml", raw)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-m", "evolm.cli", "run", str(exp), "--name", "cluster",
                           "--ray-address", two_node_cluster.address, "--workers", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    on_cluster = read_jsonl(tmp_path / "results" / "cluster" / "evaluations.jsonl")
    assert len({r["node"] for r in on_cluster if not r["cached"]}) == 2  # both nodes evaluated genomes

    ContinualRun(parse_config(raw), tmp_path / "local", lambda: LocalExecutor(threads=1)).run()
    local = read_jsonl(tmp_path / "local" / "evaluations.jsonl")
    key = lambda r: (r["stage"], r["generation"], r["genome_id"], r["status"], (r["objectives"] or {}).get("val_loss"))  # noqa: E731
    assert sorted(map(key, on_cluster)) == sorted(map(key, local))
