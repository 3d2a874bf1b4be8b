"""Every compression method through its phases in real `caffe train`, stored in `.clipq` and decoded:
the decoded caffemodel holds exactly the weights the method exported, and each method's result has the
form it promises (levels, sparsity, budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipq.caffe import caffemodel
from clipq.methods import METHODS, dns
from clipq.methods.base import Method, PruneThenShare
from clipq.methods.clipq import ClipQ
from clipq.methods.dns import Surgery
from clipq.methods.lc import LearningCompression
from clipq.plan import LayerPlan
from clipq.search import gp
from clipq.workflows import pipeline

PLAN = {"ip1": LayerPlan(0.9, 3), "ip2": LayerPlan(0.7, 4), "ip3": LayerPlan(0.5, 5)}


def make(name: str, weights: dict) -> Method:
    """The registered method `name` at a small operating point of its kind."""
    cls = METHODS[name]
    if issubclass(cls, (ClipQ, PruneThenShare)):
        return cls(name, {}, plan=PLAN)
    if issubclass(cls, Surgery):
        rates = {n: dns.c_rate_for(weights[n], 1 - lp.p) for n, lp in PLAN.items()}
        return cls(name, {}, c_rates=rates, iter_stop=4)
    if issubclass(cls, LearningCompression):
        return cls(name, {}, names=list(PLAN), kappa=30000, steps=2, mu0=0.1, growth=2.0)
    raise AssertionError(f"method {name} ({cls.__name__}) has no test setting here: add one")


@pytest.fixture(scope="module")
def compressed(trained_mlp, tmp_path_factory):
    """{method: (Method, result, trained caffemodel)} of 8 fine-tuning iterations each."""
    out = tmp_path_factory.mktemp("methods")
    config = pipeline.CompressConfig(trained_mlp["model"], trained_mlp["weights"], trained_mlp["solver"], out,
                                     settings=gp.SearchSettings(seed=0), max_iter=8, progress=False,
                                     val=trained_mlp["val"])
    nets = pipeline.prepare_nets(config)
    weights = {w.name: w.blobs[0] for w in caffemodel.read(trained_mlp["weights"]) if w.blobs}
    runs = {}
    for name in METHODS.names():
        method = make(name, weights)
        stages = pipeline.Stages(out / name)
        result = pipeline.compress_method(config, nets, stages, method, trained_mlp["weights"], lambda m: None)
        runs[name] = (method, result, Path(result["trained"]))
    return runs


@pytest.mark.parametrize("name", METHODS.names())
def test_decoded_model_is_bit_exactly_the_exported_one(compressed, name):
    method, result, trained = compressed[name]
    exported = method.export({w.name: w.blobs for w in caffemodel.read(trained) if w.name in method.layers()})
    decoded = {w.name: w.blobs for w in caffemodel.read(result["decoded"])}
    for layer, stored in exported.items():
        assert np.array_equal(decoded[layer][0], stored.weights)
        assert decoded[layer][0].shape == stored.codes.shape


def test_two_phase_methods_store_at_most_2_to_the_b_minus_1_levels_with_their_mask(compressed):
    for name in (name for name in METHODS.names() if issubclass(METHODS[name], PruneThenShare)):
        method, result, _ = compressed[name]
        decoded = {w.name: w.blobs[0] for w in caffemodel.read(result["decoded"])}
        for layer, lp in PLAN.items():
            w = decoded[layer]
            assert np.unique(w[w != 0]).size <= 2 ** lp.bits - 1
            assert abs(np.mean(w == 0) - lp.p) < 0.01  # the fixed mask of the prune phase


def test_lc_result_has_at_most_kappa_nonzero_weights_over_the_net(compressed):
    method, result, _ = compressed[LearningCompression.NAME]
    decoded = {w.name: w.blobs[0] for w in caffemodel.read(result["decoded"])}
    assert sum(np.count_nonzero(decoded[n]) for n in PLAN) <= method.kappa


def test_every_phase_gets_its_share_of_the_iterations(compressed):
    for name, (method, result, _) in compressed.items():
        phases = method.phases()
        for phase in phases:
            work = Path(result["clipq"]).parent / (phase.name if len(phases) > 1 else "")
            solver = (work / "finetune_solver.prototxt").read_text()
            assert f"max_iter: {max(1, round(8 * phase.share))}" in solver


def test_scale_schedule_shrinks_steps_and_intervals():
    from clipq.caffe import caffe_io
    param = caffe_io.caffe_pb2().SolverParameter(max_iter=3000, stepsize=2000, test_interval=1000, snapshot=1000)
    param.stepvalue.extend([1000, 2000])
    pipeline.scale_schedule(param, 0.5)
    assert (param.max_iter, param.stepsize, param.test_interval, param.snapshot) == (1500, 1000, 500, 500)
    assert list(param.stepvalue) == [500, 1000]
