"""clipq convert / export, and CLIP-Q training by the real `caffe train` on Fashion-MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import text_format

from clipq.caffe import caffe_io, convert, nets, train
from clipq.plan import LayerPlan
from clipq.util.errors import ClipqError

PLAN = {"conv1": LayerPlan(0.2, 6), "conv2": LayerPlan(0.6, 4), "ip1": LayerPlan(0.9, 3), "ip2": LayerPlan(0.5, 4)}


def lenet5_files(tmp_path, train_lmdb, test_lmdb, plan=PLAN, max_iter=300, snapshot=0):
    """A CLIP-Q LeNet-5 train_val on the given LMDBs, its plain deploy, and a solver."""
    data = nets.DataSpec(str(train_lmdb), str(test_lmdb), train_batch=64, test_batch=100,
                         input_shape=(100, 1, 28, 28), scale=1 / 256)
    plain = nets.train_val("LeNet5", nets.lenet5_body, data)
    (tmp_path / "plain.prototxt").write_text(str(plain))
    (tmp_path / "deploy.prototxt").write_text(str(nets.deploy("LeNet5", nets.lenet5_body, data)))
    (tmp_path / "clipq.prototxt").write_text(str(convert.to_clipq(plain, plan)))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path / "clipq.prototxt"}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n'
                      f'lr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 100\nmax_iter: {max_iter}\n'
                      f'snapshot: {snapshot}\nsnapshot_prefix: "{tmp_path / "snap" / "lenet5"}"\n'
                      f"solver_mode: CPU\nrandom_seed: 7\n")
    return solver


def test_convert_keeps_names_blobs_params_and_other_layers(repo):
    plain = caffe_io.read_net_param(repo / "prototxt" / "lenet5" / "train_val.prototxt")
    clipq_net = convert.to_clipq(plain, {"conv2": LayerPlan(0.5, 3)})
    before = {layer.name: layer for layer in plain.layer}
    after = {layer.name: layer for layer in clipq_net.layer}
    assert list(before) == list(after)
    conv2 = after["conv2"]
    assert conv2.type == "Python" and conv2.python_param.layer == "ClipQConvolution"
    assert list(conv2.bottom) == ["pool1"] and list(conv2.top) == ["conv2"]
    assert [(p.lr_mult, p.decay_mult) for p in conv2.param] == [(1, 1), (2, 0)]
    assert convert.clipq_configs(clipq_net)["conv2"].param["num_output"] == 50
    for name in before:
        if name != "conv2":
            assert before[name] == after[name]


def test_convert_rejects_unknown_and_non_conv_fc_layers(repo):
    plain = caffe_io.read_net_param(repo / "prototxt" / "lenet5" / "deploy.prototxt")
    with pytest.raises(ClipqError, match="'fc6', which is not in the net; compressible layers: conv1, conv2, ip1, ip2"):
        convert.to_clipq(plain, {"fc6": LayerPlan(0.5, 3)})
    with pytest.raises(ClipqError, match="layer 'pool1' is a Pooling layer"):
        convert.to_clipq(plain, {"pool1": LayerPlan(0.5, 3)})


def test_convert_cli_writes_a_prototxt_caffe_loads(repo, tmp_path):
    from clipq import cli
    (tmp_path / "plan.yaml").write_text("layers:\n  ip1: {p: 0.9, b: 3}\n")
    code = cli.main(["convert", "--model", str(repo / "prototxt/lenet5/deploy.prototxt"),
                     "--plan", str(tmp_path / "plan.yaml"), "--output", str(tmp_path / "out.prototxt")])
    assert code == 0
    cf = caffe_io.caffe()
    net = cf.Net(str(tmp_path / "out.prototxt"), cf.TEST)
    assert net.params["ip1"][0].data.shape == (500, 800)


def test_caffe_train_with_clipq_layers_learns_and_export_predicts_the_same(tmp_path, fashion_mnist_slices):
    solver = lenet5_files(tmp_path, fashion_mnist_slices["train"], fashion_mnist_slices["test"])
    trained = train.train(solver, progress=False)
    clipq_scores = caffe_io.evaluate(tmp_path / "clipq.prototxt", trained)
    assert clipq_scores["accuracy"] > 0.65  # chance is 0.10

    summary = convert.export(tmp_path / "clipq.prototxt", trained, tmp_path / "plain.caffemodel")
    assert summary["ip1"]["kept"] == pytest.approx(0.1, abs=1e-3)
    assert_same_predictions(tmp_path, trained)
    assert caffe_io.evaluate(tmp_path / "plain.prototxt", tmp_path / "plain.caffemodel") == clipq_scores


def assert_same_predictions(tmp_path, trained):
    """The exported plain deploy predicts like the CLIP-Q net on a TEST batch. (A function of its own:
    Caffe rc3, the fallback build, cannot keep two nets reading one LMDB through same-named layers.)"""
    cf = caffe_io.caffe()
    clipq_net = cf.Net(str(tmp_path / "clipq.prototxt"), str(trained), cf.TEST)
    deploy = cf.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "plain.caffemodel"), cf.TEST)
    clipq_net.forward()
    deploy.blobs["data"].data[...] = clipq_net.blobs["data"].data
    np.testing.assert_array_equal(deploy.forward()["prob"].argmax(1), clipq_net.blobs["ip2"].data.argmax(1))
    for name in PLAN:
        levels = np.unique(deploy.params[name][0].data)
        assert len(levels) <= 2 ** PLAN[name].bits  # 2^b - 1 levels + zero


def test_snapshot_and_resume_give_the_same_weights_as_one_run(tmp_path, fashion_mnist_slices):
    tiny = fashion_mnist_slices["tiny"]  # 64 images = one batch, so every iteration sees the same data
    runs = {}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        solver = lenet5_files(tmp_path / name, tiny, tiny, max_iter=20, snapshot=10)
        train.train(solver, progress=False)
        runs[name] = tmp_path / name / "snap"
    for f in runs["resumed"].glob("lenet5_iter_20.*"):
        f.unlink()
    train.train(tmp_path / "resumed" / "solver.prototxt", progress=False)
    assert "Resuming from" in (runs["resumed"] / "lenet5.log").read_text()
    whole = caffe_io.read_caffemodel(runs["whole"] / "lenet5_iter_20.caffemodel")
    resumed = caffe_io.read_caffemodel(runs["resumed"] / "lenet5_iter_20.caffemodel")
    for a, b in zip(whole.layer, resumed.layer):
        for blob_a, blob_b in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(caffe_io.blob_to_array(blob_a), caffe_io.blob_to_array(blob_b))


def test_export_names_missing_layers(tmp_path, repo):
    plain = caffe_io.read_net_param(repo / "prototxt" / "lenet5" / "deploy.prototxt")
    (tmp_path / "clipq.prototxt").write_text(str(convert.to_clipq(plain, PLAN)))
    empty = caffe_io.caffe_pb2().NetParameter()
    caffe_io.write_caffemodel(empty, tmp_path / "empty.caffemodel")
    with pytest.raises(ClipqError, match="no weights for CLIP-Q layer"):
        convert.export(tmp_path / "clipq.prototxt", tmp_path / "empty.caffemodel", tmp_path / "out.caffemodel")
    assert not (tmp_path / "out.caffemodel").exists()


SHARED = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 8 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { name: "wb" }
        inner_product_param { num_output: 8 } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { name: "wb" }
        inner_product_param { num_output: 8 } }
layer { name: "c" type: "InnerProduct" bottom: "b" top: "c" inner_product_param { num_output: 3 } }
"""


def shared_net():
    return text_format.Parse(SHARED, caffe_io.caffe_pb2().NetParameter())


def test_layers_sharing_weights_need_one_p_b_and_the_error_names_both():
    with pytest.raises(ClipqError, match=r"layers 'a' \(p 0.5, b 4\) and 'b' \(p 0.9, b 1\) share their weights"):
        convert.check_plan(shared_net(), {"a": LayerPlan(0.5, 4), "b": LayerPlan(0.9, 1)})
    convert.check_plan(shared_net(), {"a": LayerPlan(0.5, 4), "b": LayerPlan(0.5, 4)})


def test_a_layer_sharing_weights_follows_the_planned_one_and_only_the_first_is_searched():
    net = convert.to_clipq(shared_net(), {"a": LayerPlan(0.5, 4)})
    configs = {layer.name: json.loads(layer.python_param.param_str) for layer in net.layer if layer.type == "Python"}
    assert configs["a"]["p"] == configs["b"]["p"] == 0.5 and configs["a"]["bits"] == configs["b"]["bits"] == 4
    assert convert.searched_layers(shared_net()) == ["a", "c"]
