"""A node of a real two-node Ray cluster lost in the middle of a generation (issue #15).

A head (1 CPU) and a second node (1 CPU) started as Ray's own tests start them (``ray.cluster_utils.
Cluster``: separate raylets, object stores and agents on this machine); ``evolm run --ray-address`` in a
subprocess with two workers, one on each node. While the second node's worker is in an evaluation, every
process of that node (its raylet, its workers, its agents) is SIGKILLed at once: the node is gone, as when
a machine dies. What Ray 2.60 does: the driver's call to that worker fails with ``ActorUnavailableError``
("the task may or may not have been executed"); Ray's own task retries are spent within a second on the
unreachable address, and the actor cannot be restarted on the head (its one CPU is the other worker's).
What evolm does: it sends the evaluation again to the surviving worker (a warning says so), records nothing
as failed, and the run ends with results bit-identical to an uninterrupted run (a ``--no-ray`` run of the
same experiment: each evaluation fixes its seed and threads, so executors give the same bits).
"""
import signal
import time

import psutil
import pytest

from evolm.jsonfiles import read_jsonl
from tests.cli_runs import descendants, end_leftovers, run_to_end, start
from tests.conftest import shut_down_cluster, write_experiment
from tests.test_survival import assert_nothing_done_twice, assert_same, evals, one_stage_experiment, outcome


@pytest.fixture
def two_nodes():
    """A head and a second node, 1 CPU each; everything of both is stopped at the end, pass or fail."""
    from ray.cluster_utils import Cluster

    # dashboard_agent_listen_port None: a free port, not Ray's fixed default another Ray on this machine may hold
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "dashboard_agent_listen_port": None})
    try:
        yield cluster, cluster.add_node(num_cpus=1)
    finally:
        shut_down_cluster(cluster)


def node_processes(node) -> list[psutil.Process]:
    """Every process of one Ray node: its raylet with all it started (workers, agents), and the rest Ray
    started for it."""
    pids = set()
    for infos in node.all_processes.values():
        for info in infos:
            pids.add(info.process.pid)
            pids.update(p.pid for p in descendants(info.process.pid))
    procs = []
    for pid in sorted(pids):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return procs


def title(p: psutil.Process) -> str:
    try:
        return (p.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def test_a_node_lost_mid_generation_is_survived_with_identical_results(corpora, tmp_path, two_nodes):
    cluster, node = two_nodes
    exp = write_experiment(tmp_path / "one_stage.yaml", one_stage_experiment(corpora, tmp_path))
    run_to_end("run", exp, "--name", "reference", "--no-ray")

    proc = start("run", exp, "--name", "lost", "--ray-address", cluster.address, "--workers", "2")
    run_dir, busy, deadline = tmp_path / "lost", None, time.time() + 300
    try:
        while busy is None and proc.poll() is None and time.time() < deadline:
            if evals(run_dir, 1, 0) >= 1:  # both workers have their stage; the second node's in an evaluation?
                procs = node_processes(node)
                busy = next((p.pid for p in procs if title(p).startswith("ray::_RayWorker.run")), None)
                if busy is not None:
                    for p in procs:  # the whole node at once
                        try:
                            p.send_signal(signal.SIGKILL)
                        except psutil.Error:
                            pass
                    cluster.remove_node(node, allow_graceful=False)  # reaps them (they are this process's)
                    lost_at = len(read_jsonl(run_dir / "evaluations.jsonl"))
            time.sleep(0.01)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            end_leftovers([proc], grace=0)
    assert busy is not None, "the second node's worker was never seen in an evaluation"
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    retried = [line for line in err.splitlines() if "a Ray worker became unreachable evaluating" in line]
    assert len(retried) == 1, err[-3000:]
    genome = retried[0].split("evaluating ")[1].split()[0]

    records = read_jsonl(run_dir / "evaluations.jsonl")
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    head, second = cluster.head_node.node_id[:12], node.node_id[:12]
    again = [r for r in records if r["genome_id"] == genome and not r["cached"]]
    assert len(again) == 1 and again[0]["node"] == head, again  # evaluated once more, on the surviving node
    assert all(r["node"] != second for r in records[lost_at:]), "the lost node evaluated after it was lost"
    assert_same(outcome(run_dir), outcome(tmp_path / "reference"))
    assert_nothing_done_twice(run_dir)
