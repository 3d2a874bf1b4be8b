"""The per-layer Bayesian search: objective, GP-EI on a synthetic problem, resuming from the log,
and the (error, c_i) measurement in real Caffe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clipq.caffe import caffe_io, nets
from clipq.quant.prune_quant import clip_quantize
from clipq.search import gp, job, local, plots, subset_eval
from clipq.search import log as search_log
from clipq.search.gp import SearchSettings
from clipq.util.errors import ClipqError
from conftest import random_caffemodel


def synthetic(layer, p, bits):
    """Minimum at p = 0.6, bits = 3 (error in 'percent', no benefit)."""
    return 100 * (p - 0.6) ** 2 + (bits - 3) ** 2, 0.0


def test_objective_is_error_minus_lambda_times_benefit():
    assert gp.objective(7.5, 0.25, 10) == pytest.approx(5.0)
    assert [gp.round_bits(b) for b in (0.5, 1.49, 1.5, 8.4, 8.5)] == [1, 1, 2, 8, 8]


def test_gp_ei_finds_the_optimum_of_a_cheap_objective(tmp_path):
    settings = SearchSettings(iterations=25, initial=5, seed=1)
    history = local.search_layer("toy", 0, synthetic, settings, tmp_path, "model")
    found = gp.best(history)
    assert abs(found.p - 0.6) < 0.1 and found.bits == 3
    assert found.objective < 1.0
    assert min(e.objective for e in history[:5]) > found.objective  # the GP improved on the random start


def test_a_killed_search_resumes_without_repeating_logged_evaluations(tmp_path):
    settings = SearchSettings(iterations=9, initial=3, seed=2)
    calls = []

    def dies_after_five(layer, p, bits):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append((p, bits))
        return synthetic(layer, p, bits)

    with pytest.raises(KeyboardInterrupt):
        local.search_layer("toy", 0, dies_after_five, settings, tmp_path, "model")
    log = search_log.layer_log(tmp_path, "toy")
    first = log.read_text().splitlines()
    assert len(first) == 1 + 5
    calls.clear()
    history = local.search_layer("toy", 0, lambda *a: (calls.append(a), synthetic(*a))[1], settings, tmp_path, "model")
    assert len(history) == 9 and len(calls) == 4
    assert log.read_text().splitlines()[:6] == first
    assert [e.iteration for e in history] == list(range(9))


def test_a_log_from_other_settings_is_refused(tmp_path):
    local.search_layer("toy", 0, synthetic, SearchSettings(iterations=2, initial=2), tmp_path, "model")
    with pytest.raises(ClipqError, match="other settings, another model"):
        local.search_layer("toy", 0, synthetic, SearchSettings(iterations=2, initial=2, lam=5), tmp_path, "model")


def test_fig3_plot_is_written(tmp_path):
    history = local.search_layer("a/b", 0, synthetic, SearchSettings(iterations=3, initial=3), tmp_path, "m")
    plots.plot_layer("a/b", history, tmp_path / "plot.png", lam=10)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert search_log.layer_log(tmp_path, "a/b").name == "a%2Fb.jsonl"


def test_a_log_measured_on_other_data_is_refused(tmp_path):
    settings = SearchSettings(iterations=2, initial=2)
    local.search_layer("toy", 0, synthetic, settings, tmp_path, "model", data="/data/val_lmdb")
    assert len(local.search_layer("toy", 0, synthetic, settings, tmp_path, "model", data="/data/val_lmdb")) == 2
    with pytest.raises(ClipqError, match="other data"):
        local.search_layer("toy", 0, synthetic, settings, tmp_path, "model", data="/data/train_lmdb")


def test_a_subset_larger_than_the_lmdb_is_capped_with_a_message():
    messages = []
    capped = job.capped_settings(SearchSettings(subset=5000), 4321, "val_lmdb", messages.append)
    assert capped.subset == 4300 and "4321 images" in messages[0]
    assert job.capped_settings(SearchSettings(subset=5000), 64, "tiny", messages.append).subset == 64
    assert job.capped_settings(SearchSettings(subset=500), 4321, "x", messages.append).subset == 500


@pytest.fixture(scope="module")
def search_net(tmp_path_factory, fashion_mnist_slices):
    """LeNet-300-100 with random weights, and its search net on a 500-image subset of the training slice."""
    tmp = tmp_path_factory.mktemp("subset")
    data = nets.DataSpec(str(fashion_mnist_slices["train"]), str(fashion_mnist_slices["test"]), 64, 100,
                         (100, 1, 28, 28), scale=1 / 256)
    net = nets.train_val("mlp", nets.lenet300_100_body, data)
    subset_eval.write_subset(subset_eval.training_source(net, "net"), 500, 0, tmp / "subset")
    eval_net, accuracy = subset_eval.eval_net_param(net, tmp / "subset", 500, "net")
    (tmp / "eval.prototxt").write_text(str(eval_net))
    deploy = tmp / "deploy.prototxt"
    deploy.write_text(str(nets.deploy("mlp", nets.lenet300_100_body, data)))
    random_caffemodel(deploy, tmp / "w.caffemodel", std=0.05)
    return tmp / "eval.prototxt", tmp / "w.caffemodel", accuracy


@pytest.fixture(scope="module")
def evaluator(search_net):
    prototxt, weights, blobs = search_net
    return subset_eval.SubsetEvaluator(prototxt, weights, blobs, 500)


def scores_and_labels(evaluator) -> tuple[np.ndarray, np.ndarray]:
    """Every batch's class scores and labels, by numpy from the evaluator's own net."""
    scores, labels = [], []
    for _ in range(evaluator.iterations):
        evaluator.net.forward()
        scores.append(evaluator.net.blobs[evaluator.blobs.scores].data.astype(np.float64).copy())
        labels.append(evaluator.net.blobs["label"].data.astype(int).copy())
    return np.concatenate(scores), np.concatenate(labels)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_the_loss_metric_is_100_times_the_mean_cross_entropy(search_net):
    prototxt, weights, blobs = search_net
    evaluator = subset_eval.SubsetEvaluator(prototxt, weights, blobs, 500, "loss")
    scores, labels = scores_and_labels(evaluator)
    expected = -100 * np.mean(log_softmax(scores)[np.arange(labels.size), labels])
    assert evaluator.measure() == pytest.approx(expected, rel=1e-4)


def test_the_kl_metric_is_0_for_the_uncompressed_net_and_the_divergence_from_it_otherwise(search_net):
    prototxt, weights, blobs = search_net
    evaluator = subset_eval.SubsetEvaluator(prototxt, weights, blobs, 500, "kl")
    assert abs(evaluator.measure()) < 1e-6
    reference = log_softmax(scores_and_labels(evaluator)[0])
    value, _ = evaluator("ip1", 0.9, 2)
    w = evaluator.net.params["ip1"][0].data
    w[...] = clip_quantize(evaluator.original["ip1"][0], 0.9, 2).weights
    compressed = log_softmax(scores_and_labels(evaluator)[0])
    w[...] = evaluator.original["ip1"][0]
    expected = 100 * np.mean(np.sum(np.exp(reference) * (reference - compressed), axis=1))
    assert expected > 0.1 and value == pytest.approx(expected, rel=1e-4)


def test_an_unknown_metric_or_a_loss_the_net_lacks_is_refused(search_net):
    prototxt, weights, blobs = search_net
    with pytest.raises(ClipqError, match="--search-metric must be one of error, loss, kl"):
        subset_eval.SubsetEvaluator(prototxt, weights, blobs, 500, "mse")
    with pytest.raises(ClipqError, match="needs a SoftmaxWithLoss layer"):
        subset_eval.SubsetEvaluator(prototxt, weights, dataclasses.replace(blobs, loss=None), 500, "loss")


def test_error_and_benefit_have_the_right_sign_and_scale(evaluator):
    base = evaluator.measure()
    assert 0 < base < 100
    error, benefit = evaluator("ip1", 0.0, 8)
    assert abs(error - base) < 3  # 255 levels barely change the net
    ip1_share = (784 * 300 + 300) / (784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert 0.7 * ip1_share < benefit < ip1_share  # 8 bits + indices instead of 32 bits
    _, more = evaluator("ip1", 0.9, 2)
    assert benefit < more < ip1_share
    _, small = evaluator("ip3", 0.9, 2)
    assert 0 < small < 0.01
    assert evaluator.measure() == pytest.approx(base)  # the layer was restored


def test_subset_is_a_random_sample_of_the_training_lmdb(tmp_path, fashion_mnist_slices):
    import lmdb

    subset_eval.write_subset(str(fashion_mnist_slices["train"]), 300, 1, tmp_path / "s")
    env = lmdb.open(str(tmp_path / "s"), readonly=True, lock=False)
    assert env.stat()["entries"] == 300
    with pytest.raises(ClipqError, match="fewer than the subset's 100000"):
        subset_eval.write_subset(str(fashion_mnist_slices["train"]), 100000, 1, tmp_path / "t")


def test_a_net_without_train_data_names_the_option_of_each_command():
    net = caffe_io.caffe_pb2().NetParameter(name="n")
    with pytest.raises(ClipqError, match=r"`clipq search --data LMDB`, `--val LMDB` in compress / zoo"):
        subset_eval.training_source(net, "n.prototxt")


def test_every_layer_name_gets_its_own_log_file_name():
    names = ["conv1/7x7_s2", "conv1__7x7_s2", "a" * 300, "a" * 299 + "b", "nul\0name", ".hidden", "ip1"]
    stems = [search_log.file_stem(name) for name in names]
    assert len(set(stems)) == len(names) and search_log.file_stem("ip1") == "ip1"
    assert all(len(stem) <= 120 and "/" not in stem and "\0" not in stem and not stem.startswith(".") for stem in stems)


def test_a_log_under_the_old_name_is_kept_for_its_layer(tmp_path):
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "conv1__7x7_s2.jsonl").write_text('{"layer": "conv1/7x7_s2"}\n{"iteration": 0}\n')
    path = search_log.layer_log(tmp_path, "conv1/7x7_s2")
    assert path.name == "conv1%2F7x7_s2.jsonl" and path.read_text().endswith('{"iteration": 0}\n')
    assert search_log.layer_log(tmp_path, "conv1__7x7_s2").name == "conv1__7x7_s2.jsonl"
