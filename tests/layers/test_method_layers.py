"""The baselines' Caffe layers (layers/clipq_layers.py) in real Caffe against numpy statements of their
rules: forward = Caffe's own layer run with the method's weights; backward = Caffe's gradient handed to the
learnable blob as the method says; state blobs frozen and kept across a snapshot and `--snapshot` resume."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, caffemodel, convert, train
from clipq.methods import deep_compression, dns
from clipq.methods.base import LayerRole, shared
from clipq.workflows import pipeline

PLAIN = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "layer" type: "%s" bottom: "x" top: "y" %s }"""
PARAMS = {"Convolution": 'convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } '
                         'bias_filler { type: "constant" value: 0.1 } }',
          "InnerProduct": 'inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.1 } '
                          'bias_filler { type: "constant" value: 0.1 } }'}


def nets(tmp_path, kind: str, role: LayerRole, phase: str = "TRAIN"):
    """(method net, plain Caffe net) of one layer `layer` on input `x`."""
    cf = caffe_io.caffe()
    plain = tmp_path / f"plain_{kind}.prototxt"
    plain.write_text(PLAIN % (kind, PARAMS[kind]))
    method = tmp_path / f"{role.kind}_{kind}.prototxt"
    method.write_text(str(convert.to_method_net(caffe_io.read_net_param(plain), {"layer": role})))
    return cf.Net(str(method), getattr(cf, phase)), cf.Net(str(plain), cf.TRAIN)


def step(net, x, dy):
    """Forward and backward once; (output, the layer's blob diffs)."""
    net.blobs["x"].data[...] = x
    net.forward()
    for blob in net.params["layer"]:
        blob.diff[...] = 0
    net.blobs["y"].diff[...] = dy
    net.backward()
    return net.blobs["y"].data.copy(), [blob.diff.copy() for blob in net.params["layer"]]


def run_both(method, plain, weights):
    """Run the method net and the plain net (with `weights`, the bias shared); return both results."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=method.blobs["x"].data.shape).astype(np.float32)
    plain.params["layer"][0].data[...] = weights
    plain.params["layer"][1].data[...] = method.params["layer"][1].data
    method.forward()  # output shape for dy
    dy = rng.normal(size=method.blobs["y"].data.shape).astype(np.float32)
    return step(method, x, dy), step(plain, x, dy)


@pytest.mark.parametrize("kind", ["Convolution", "InnerProduct"])
def test_masked_layer_forwards_w_times_mask_and_masks_the_gradient(tmp_path, kind):
    method, plain = nets(tmp_path, kind, LayerRole("Masked", state_blobs=1))
    w, bias, mask = method.params["layer"]
    mask.data[...] = np.random.default_rng(0).random(mask.data.shape) < 0.5
    (y, diffs), (y_ref, diffs_ref) = run_both(method, plain, w.data * mask.data)
    assert np.allclose(y, y_ref, atol=1e-6)
    assert np.allclose(diffs[0], diffs_ref[0] * mask.data, atol=1e-6)
    assert np.allclose(diffs[1], diffs_ref[1], atol=1e-6)
    assert not diffs[2].any()  # the state blob gets no gradient


@pytest.mark.parametrize("kind", ["Convolution", "InnerProduct"])
def test_shared_layer_forwards_the_codebook_and_sums_gradients_per_centroid(tmp_path, kind):
    method, plain = nets(tmp_path, kind, LayerRole("Shared", {"bits": 2}, state_blobs=1))
    codebook, bias, codes = method.params["layer"]
    assert codebook.data.shape == (3,)
    codebook.data[...] = [-0.2, 0.05, 0.3]
    codes.data[...] = np.random.default_rng(0).integers(0, 4, codes.data.shape)
    (y, diffs), (y_ref, diffs_ref) = run_both(method, plain, shared(codes.data, codebook.data))
    assert np.allclose(y, y_ref, atol=1e-6)
    assert np.allclose(diffs[0], deep_compression.centroid_gradient(diffs_ref[0], codes.data, 3), atol=1e-5)


def test_surgery_layer_prunes_and_splices_at_a_training_step_and_passes_every_gradient(tmp_path):
    method, plain = nets(tmp_path, "InnerProduct", LayerRole("Surgery", {"c_rate": 0.0, "iter_stop": 5}, state_blobs=2))
    w, bias, mask, state = method.params["layer"]
    mu, sigma = dns.magnitude_statistics(w.data)
    state.data[...] = [0, mu, sigma]
    mask.data[...] = np.random.default_rng(0).random(mask.data.shape) < 0.5   # some pruned weights to splice
    expected = dns.update_mask(w.data, mask.data, dns.threshold(mu, sigma, 0.0))  # probability 1 at 0
    assert (expected > mask.data).any() and (expected < mask.data).any()
    (y, diffs), (y_ref, diffs_ref) = run_both(method, plain, w.data * expected)
    assert np.array_equal(mask.data, expected) and state.data[0] == 2  # run_both forwards twice
    assert np.allclose(y, y_ref, atol=1e-6)
    assert np.allclose(diffs[0], diffs_ref[0], atol=1e-6)  # pruned weights learn too: they can come back


def test_surgery_layer_in_the_test_phase_only_reads_the_mask(tmp_path):
    method, _ = nets(tmp_path, "InnerProduct", LayerRole("Surgery", {"c_rate": 5.0, "iter_stop": 5}, state_blobs=2),
                     "TEST")
    _, _, mask, state = method.params["layer"]
    state.data[...] = [0, 0.01, 0.01]
    method.forward()
    assert mask.data.all() and state.data[0] == 0


def test_lc_layer_adds_the_augmented_lagrangian_gradient(tmp_path):
    method, plain = nets(tmp_path, "InnerProduct", LayerRole("LC", {"mu": 0.5}, state_blobs=2))
    w, bias, theta, lam = method.params["layer"]
    rng = np.random.default_rng(0)
    theta.data[...] = np.where(rng.random(w.data.shape) < 0.3, w.data, 0)
    lam.data[...] = rng.normal(0, 0.01, lam.data.shape)
    (y, diffs), (y_ref, diffs_ref) = run_both(method, plain, w.data)
    assert np.allclose(y, y_ref, atol=1e-6)
    assert np.allclose(diffs[0], diffs_ref[0] + 0.5 * (w.data - theta.data) - lam.data, atol=1e-6)


def test_state_blobs_are_frozen_in_the_prototxt(tmp_path):
    (tmp_path / "p.prototxt").write_text(PLAIN % ("InnerProduct", PARAMS["InnerProduct"]))
    net = convert.to_method_net(caffe_io.read_net_param(tmp_path / "p.prototxt"),
                                {"layer": LayerRole("Surgery", {"c_rate": 1, "iter_stop": 1}, state_blobs=2)})
    params = net.layer[1].param
    assert [(p.lr_mult, p.decay_mult) for p in params[2:]] == [(0, 0), (0, 0)] and len(params) == 4


def test_surgery_mask_survives_a_snapshot_and_snapshot_resume(trained_mlp, tmp_path):
    net_param = caffe_io.read_net_param(trained_mlp["model"])
    method = dns.Surgery("dns", {}, c_rates={"ip1": 1.0, "ip2": 1.0, "ip3": 1.0}, iter_stop=6, seed=0)
    method.bias = {"ip1": True, "ip2": True, "ip3": True}
    phase = method.phases()[0]
    start = tmp_path / "start.caffemodel"
    pipeline.prepare_phase(phase, trained_mlp["weights"], method.layers(), start)
    (tmp_path / "net.prototxt").write_text(str(convert.to_method_net(net_param, phase.roles)))
    solver = ('net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 10\nsnapshot: 5\n'
              'snapshot_prefix: "{prefix}"\nsolver_mode: CPU\nrandom_seed: 1\n')
    for run in ("a", "b"):
        text = solver.format(net=tmp_path / "net.prototxt", prefix=tmp_path / run / "s")
        (tmp_path / f"{run}.prototxt").write_text(text)
    final_a = train.train(tmp_path / "a.prototxt", weights=start, progress=False)
    # run b: the same training, stopped after the snapshot at iteration 5, then resumed by `clipq train`
    (tmp_path / "b").mkdir()
    for suffix in ("caffemodel", "solverstate"):
        (tmp_path / "b" / f"s_iter_5.{suffix}").write_bytes((tmp_path / "a" / f"s_iter_5.{suffix}").read_bytes())
    final_b = train.train(tmp_path / "b.prototxt", weights=start, progress=False)

    def state(path):
        return {w.name: w.blobs for w in caffemodel.read(path) if w.name in method.layers()}

    at5, a, b = state(tmp_path / "a" / "s_iter_5.caffemodel"), state(final_a), state(final_b)
    for name in method.layers():
        assert not at5[name][2].all()                      # surgery pruned weights by iteration 5
        assert at5[name][3][0] == 5 and b[name][3][0] == 10  # the iteration count went on from the snapshot
        assert np.array_equal(a[name][2], b[name][2])      # the same mask as the uninterrupted run
