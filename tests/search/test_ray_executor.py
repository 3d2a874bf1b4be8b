"""The search on Ray: a two-node Ray cluster on 127.0.0.1 started here gives the local executor's plan and
logs (batch 1, same seed); an actor whose process dies has its evaluation redone, logged exactly once."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from clipq.caffe import nets
from clipq.cli import main
from clipq.search import driver, gp, local, ray_executor
from clipq.search import log as search_log
from clipq.search.gp import SearchSettings
from clipq.search.job import SearchJob
from clipq.util.errors import ClipqError


def synthetic(layer, p, bits):
    """Minimum at p = 0.6, bits = 3 (as in test_search)."""
    return 100 * (p - 0.6) ** 2 + (bits - 3) ** 2, 0.0


def dies_once(marker: str, after: int):
    """An evaluator whose process exits at its `after`-th call, once per `marker` (a real death: Ray restarts it)."""
    calls = []

    def evaluate(layer, p, bits):
        calls.append(layer)
        if len(calls) == after and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return synthetic(layer, p, bits)
    return evaluate


def test_the_local_executor_never_imports_ray():
    code = "import sys, clipq.cli, clipq.search.driver, clipq.workflows.pipeline; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_batch_of_suggestions_has_distinct_points_and_batch_one_is_sequential(tmp_path):
    settings = SearchSettings(iterations=12, initial=4, seed=3)
    history = local.search_layer("toy", 0, synthetic, SearchSettings(iterations=6, initial=4, seed=3), tmp_path, "m")
    batch = gp.suggest_batch(history, settings, 0, 3)
    assert len(batch) == 3 and len(set(batch)) == 3
    assert gp.suggest_batch(history, settings, 0, 1) == gp.suggest_batch(history, settings, 0, 1)
    initial = gp.suggest_batch(history[:1], settings, 0, 5)  # capped at the end of the random design
    assert initial == [(e.p, e.b_raw) for e in history[1:4]]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head and a second node, both on 127.0.0.1 only, one CPU each; this process connected to it."""
    tmp = tempfile.mkdtemp(prefix="clipq-ray-test-")
    saved = dict(os.environ)
    os.environ.update(ray_executor.loopback_env(tmp))  # before Ray's import: it reads the auth settings then
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": ray_executor.LOCAL_OBJECT_STORE}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)


def entries_without_time(out, layer):
    lines = [json.loads(line) for line in search_log.layer_log(out, layer).read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in lines]


@pytest.mark.slow  # ~30 s on 2 cores (3 layers x 7 evaluations, twice), plus the cluster's ~12 s start
def test_ray_with_batch_one_gives_the_local_plan_and_logs(ray_cluster, trained_mlp, tmp_path):
    settings = SearchSettings(iterations=7, initial=3, subset=500, seed=4)
    args = (trained_mlp["model"], trained_mlp["weights"])
    local = driver.run(*args, tmp_path / "local", settings=settings, jobs=1, progress=False)
    on_ray = driver.run(*args, tmp_path / "ray", settings=settings, jobs=2, progress=False,
                        ray=ray_cluster.address, batch=1)
    assert on_ray == local and len(local) == 3
    for layer in local:
        assert entries_without_time(tmp_path / "ray", layer) == entries_without_time(tmp_path / "local", layer)
    assert (tmp_path / "ray" / "plan.yaml").read_text() == (tmp_path / "local" / "plan.yaml").read_text()


def test_a_dead_actor_has_its_evaluation_redone_and_logged_once(ray_cluster, tmp_path):
    settings = SearchSettings(iterations=8, initial=3, seed=5)
    job = SearchJob("unused", "unused", "unused", str(tmp_path), settings, "model", "", ("toy",))
    marker = tmp_path / "died"
    ray_executor.run(job, [(0, "toy")], ray_cluster.address, workers=2, progress=False,
                     make=functools.partial(dies_once, str(marker), 3))  # one layer, two workers: batches of 2
    assert marker.exists()
    history = search_log.read_log(search_log.layer_log(tmp_path, "toy"), "toy", settings, "model")
    assert [e.iteration for e in history] == list(range(8))
    assert all((e.error, e.benefit) == synthetic("toy", e.p, e.bits) for e in history)
    assert len({(e.p, e.b_raw) for e in history}) == 8
    # resuming finds nothing left to do: the log stays as it is
    before = search_log.layer_log(tmp_path, "toy").read_text()
    ray_executor.run(job, [(0, "toy")], ray_cluster.address, workers=1, progress=False, make=lambda: synthetic)
    assert search_log.layer_log(tmp_path, "toy").read_text() == before


def test_clipq_zoo_searches_on_the_ray_it_is_given(ray_cluster, trained_mlp, tmp_path, monkeypatch):
    """`clipq zoo --search --ray ADDRESS` runs its search on that Ray (once ZooConfig copied the options by hand
    and dropped --ray): the Ray executor is called with the address and the search runs there."""
    addresses = []
    run_on_ray = ray_executor.run
    monkeypatch.setattr(ray_executor, "run", lambda job, layers, address, *a, **k:
                        addresses.append(address) or run_on_ray(job, layers, address, *a, **k))
    data = nets.DataSpec("unused", "unused", 64, 100, (100, 1, 28, 28), scale=1 / 256)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(str(nets.deploy("mlp", nets.lenet300_100_body, data)))
    code = main(["zoo", "--model", str(deploy), "--weights", str(trained_mlp["weights"]), "--train-val",
                 str(trained_mlp["model"]), "--search", "--iterations", "2", "--initial", "2", "--subset", "100",
                 "--ray", ray_cluster.address, "--jobs", "2", "--out", str(tmp_path / "zoo"), "--no-progress"])
    assert code == 0 and addresses == [ray_cluster.address]
    assert all(len(search_log.read_histories(tmp_path / "zoo" / "search", [layer])[layer]) == 2
               for layer in ("ip1", "ip2", "ip3"))


def test_a_cluster_address_where_nothing_listens_is_one_line_within_seconds():
    import time

    start = time.monotonic()
    with pytest.raises(ClipqError, match=r"--ray 127.0.0.1:1: nothing answers there within 5 s"):
        ray_executor.connected("127.0.0.1:1", 1).__enter__()
    assert time.monotonic() - start < 10
