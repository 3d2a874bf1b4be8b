"""`clipq zoo` on a model we train ourselves in an architecture unlike the paper's (BatchNorm/Scale, a residual
block, a GoogLeNet-style Concat), on a V1-format LeNet and on a two-input net. Real Caffe throughout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from clipq.caffe import caffe_io
from clipq.data import datasets
from clipq.search.gp import SearchSettings
from clipq.util.errors import ClipqError
from clipq.workflows import zoo
from clipq.workflows.pipeline import CompressConfig
from conftest import MINI_LAYERS, random_caffemodel

SOLVER = ('net: "{net}"\nbase_lr: {lr}\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
          'max_iter: {iters}\nsnapshot: 0\nsnapshot_prefix: "{prefix}"\nsolver_mode: CPU\nrandom_seed: 1\n')


ZOO_FIELDS = {f.name for f in dataclasses.fields(zoo.ZooConfig)}


def zoo_config(deploy: Path, weights: Path, out: Path, **kwargs) -> zoo.ZooConfig:
    """A ZooConfig; of `kwargs`, its own fields go to it, the rest to the CompressConfig it wraps."""
    own = {name: kwargs.pop(name) for name in list(kwargs) if name in ZOO_FIELDS}
    return zoo.ZooConfig(CompressConfig(deploy, weights, kwargs.pop("solver", None), out, **kwargs), **own)


def config(mini: dict[str, Path], out: Path, **kwargs) -> zoo.ZooConfig:
    return zoo_config(mini["deploy"], mini["weights"], out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def mild(mini, tmp_path_factory) -> dict:
    return zoo.run(config(mini, tmp_path_factory.mktemp("mild"), p=0.3, bits=8, batch=64), log=lambda m: None)


@pytest.fixture(scope="module")
def aggressive(mini, tmp_path_factory) -> dict:
    return zoo.run(config(mini, tmp_path_factory.mktemp("aggressive"), p=0.95, bits=1, batch=64),
                   log=lambda m: None)


def test_mild_plan_keeps_top1_predictions_on_random_inputs(mild):
    compared = mild["comparison"]
    assert compared["samples"] == 64 and compared["output"] == "prob"
    assert compared["top1_agreement"] >= 0.9
    assert 0 < compared["mean_abs_diff"] <= compared["max_abs_diff"] <= 1  # softmax outputs


def test_mild_plan_makes_a_smaller_file(mild):
    sizes = mild["size"]
    assert sizes["clipq_file_bytes"] == Path(mild["files"]["clipq"]).stat().st_size
    assert sizes["clipq_file_bytes"] < sizes["float32_bytes"] < sizes["caffemodel_bytes"]
    assert sizes["rate"] > 1.5


def test_aggressive_plan_agrees_less_than_the_mild_one(mild, aggressive):
    assert aggressive["comparison"]["top1_agreement"] < mild["comparison"]["top1_agreement"]
    assert aggressive["comparison"]["mean_abs_diff"] > mild["comparison"]["mean_abs_diff"]
    assert aggressive["size"]["clipq_file_bytes"] < mild["size"]["clipq_file_bytes"]


def test_report_has_the_layer_table_and_is_written(mild):
    assert [row["layer"] for row in mild["layers"]] == MINI_LAYERS + ["Overall"]
    out = Path(mild["files"]["clipq"]).parent
    assert json.loads((out / "zoo_report.json").read_text()) == mild
    markdown = (out / "zoo_report.md").read_text()
    assert "| **Overall** |" in markdown and "top-1 agreement" in markdown
    assert mild["upgraded"] == {"prototxt": False, "caffemodel": False, "legacy_blob_shapes": False,
                                "train_val": False}


def test_the_compressed_model_is_written_as_onnx_predicting_as_the_decoded_caffemodel(mild):
    onnx = mild["onnx"]
    path = Path(mild["files"]["clipq"]).with_suffix(".onnx")
    assert onnx["file"] == str(path) and onnx["bytes"] == path.stat().st_size
    assert onnx["compressed"] == {name: "UINT8" for name in MINI_LAYERS}
    compared = onnx["comparison"]
    assert compared["output"] == "prob" and compared["agreeing_decoded"] == compared["compared"] == 64
    assert compared["agreeing_original"] == mild["comparison"]["agreeing"]
    assert compared["max_abs_diff_decoded"] < 1e-4
    assert f"model.onnx {onnx['bytes']:,} bytes" in (path.parent / "zoo_report.md").read_text()


def test_no_onnx_writes_no_onnx_file(mini, tmp_path):
    report = zoo.run(config(mini, tmp_path, p=0.3, bits=8, onnx=False), log=lambda m: None)
    assert report["onnx"] is None and not list(tmp_path.glob("*.onnx"))
    assert "ONNX: not written (--no-onnx)" in (tmp_path / "zoo_report.md").read_text()


def test_listing_names_exactly_the_convolution_and_inner_product_layers(mini, tmp_path):
    expected = [layer.name for layer in caffe_io.read_net_param(mini["deploy"]).layer
                if layer.type in ("Convolution", "InnerProduct")]
    rows = zoo.list_compressible(config(mini, tmp_path))
    assert [row.name for row in rows] == expected == MINI_LAYERS
    fc = rows[-1]
    assert (fc.type, fc.weight_shape, fc.params) == ("InnerProduct", (10, 32), 10 * 32 + 10)
    assert rows[0].weight_shape == (16, 1, 3, 3) and 0 < sum(row.share for row in rows) < 1  # BN/Scale hold the rest


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> Path:
    """The first 200 Fashion-MNIST test images, preprocessed as the Data layers do (scale 1/256)."""
    test = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    path = tmp_path_factory.mktemp("inputs") / "images.npy"
    np.save(path, test.images[:200].reshape(200, 1, 28, 28).astype(np.float32) / 256)
    return path


def test_inputs_file_of_real_images_is_compared(mini, real_images, tmp_path):
    report = zoo.run(config(mini, tmp_path / "out", p=0.1, bits=8, inputs=real_images), log=lambda m: None)
    compared = report["comparison"]
    assert compared["inputs"] == str(real_images)
    assert (compared["samples"], compared["compared"]) == (200, 200)  # 13 batches of 16, the last one short
    assert compared["original_classes"] >= 5  # real images, unlike noise, spread over the classes
    assert compared["top1_agreement"] >= 0.9


def test_fine_tuning_with_a_solver_brings_predictions_back(mini, real_images, tmp_path):
    solver = tmp_path / "finetune.prototxt"
    solver.write_text(SOLVER.format(net="replaced", lr=0.002, iters=100, prefix="replaced"))
    common = dict(p=0.6, bits=4, inputs=real_images, batch=100, train_val=mini["train_val"])
    as_trained = zoo.run(config(mini, tmp_path / "none", **common), log=lambda m: None)
    finetuned = zoo.run(config(mini, tmp_path / "tuned", solver=solver, **common), log=lambda m: None)
    assert not as_trained["finetuned"] and finetuned["finetuned"]
    assert finetuned["files"]["decoded"] == str(tmp_path / "tuned" / "compress" / "decoded.caffemodel")
    assert finetuned["comparison"]["top1_agreement"] > as_trained["comparison"]["top1_agreement"] + 0.1
    assert set(finetuned["finetune_accuracy"]) == {"baseline", "clipq_net", "decoded"}


def test_inputs_of_the_wrong_shape_are_refused(mini, tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(ClipqError, match=r"images.npy: input 'data' has shape \(4, 3, 28, 28\)"):
        zoo.run(config(mini, tmp_path / "out", p=0.3, bits=8, inputs=tmp_path / "images.npy"), log=lambda m: None)


def test_plan_naming_a_missing_layer_is_refused_with_its_name(mini, tmp_path):
    (tmp_path / "plan.yaml").write_text("version: 1\nlayers:\n  conv1: {p: 0.5, b: 4}\n  conv9: {p: 0.5, b: 4}\n")
    with pytest.raises(ClipqError, match="'conv9', which is not in the net"):
        zoo.run(config(mini, tmp_path / "out", plan=tmp_path / "plan.yaml"), log=lambda m: None)


def test_search_without_train_val_is_refused(mini, tmp_path):
    with pytest.raises(ClipqError, match="--search needs --train-val"):
        zoo.run(config(mini, tmp_path / "out", search=True), log=lambda m: None)


def test_max_drop_without_search_and_solver_is_refused(mini, tmp_path):
    with pytest.raises(ClipqError, match="--max-drop needs --search and --solver"):
        zoo.run(config(mini, tmp_path / "out", p=0.5, bits=4, max_drop=1.0), log=lambda m: None)


def test_max_drop_fine_tunes_searched_rounds_and_reports_the_chosen_one(mini, fashion_mnist_slices, tmp_path):
    solver = tmp_path / "finetune.prototxt"
    solver.write_text(SOLVER.format(net="replaced", lr=0.002, iters=30, prefix="replaced"))
    settings = SearchSettings(iterations=3, initial=3, subset=300)
    report = zoo.run(config(mini, tmp_path / "out", search=True, train_val=mini["train_val"], solver=solver,
                            settings=settings, val=fashion_mnist_slices["val"], max_drop=50.0, rounds=2),
                     log=lambda m: None)
    assert report["budget"]["met"] and len(report["budget"]["rounds"]) == 2
    assert "within --max-drop 50" in report["plan"]["source"]
    assert report["files"]["clipq"] == str(tmp_path / "out" / "compress" / "final_model.clipq")
    assert (tmp_path / "out" / "plan.yaml").read_text().count("{p:") == len(MINI_LAYERS)


def test_p_without_b_is_refused(mini, tmp_path):
    with pytest.raises(ClipqError, match="--p and --b go together"):
        zoo.run(config(mini, tmp_path / "out", p=0.5), log=lambda m: None)


def test_search_on_train_val_makes_the_plan(mini, tmp_path):
    settings = SearchSettings(iterations=2, initial=2, subset=100)
    report = zoo.run(config(mini, tmp_path / "out", search=True, train_val=mini["train_val"], settings=settings),
                     log=lambda m: None)
    assert report["plan"]["source"].startswith("searched")
    assert [row["layer"] for row in report["layers"]] == MINI_LAYERS + ["Overall"]
    assert (tmp_path / "out" / "search" / "plan.yaml").exists()


@pytest.mark.slow
def test_an_imagenet_size_net_is_compressed_and_compared(repo, tmp_path):
    """BVLC AlexNet's deploy with random weights (61M parameters, 244 MB): ~15 s, 1.8 GB."""
    deploy = repo / "prototxt" / "alexnet" / "deploy.prototxt"
    random_caffemodel(deploy, tmp_path / "w.caffemodel", std=0.01)
    report = zoo.run(zoo_config(deploy, tmp_path / "w.caffemodel", tmp_path / "out", p=0.5, bits=5, batch=10,
                                   progress=False), log=lambda m: None)
    assert report["size"]["rate"] > 8 and report["comparison"]["samples"] == 10
    assert [row["layer"] for row in report["layers"]][-2:] == ["fc8", "Overall"]


# --- a model in Caffe's deprecated V1 format ----------------------------------------------------------

V1_LENET = """name: "LeNetV1"
input: "data"
input_dim: 8
input_dim: 1
input_dim: 28
input_dim: 28
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1" inner_product_param { num_output: 50 } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 } }
layers { name: "prob" type: SOFTMAX bottom: "ip2" top: "prob" }
"""
V1_SHAPES = {"conv1": [(20, 1, 5, 5), (20,)], "ip1": [(50, 2880), (50,)], "ip2": [(10, 50), (10,)]}


def write_v1_caffemodel(path: Path, seed: int = 0) -> None:
    """A caffemodel as 2014 Caffe wrote them: V1LayerParameter `layers`, blobs with legacy 4-D num/channels/
    height/width shapes."""
    pb2 = caffe_io.caffe_pb2()
    net = pb2.NetParameter(name="LeNetV1")
    rng = np.random.default_rng(seed)
    types = {"conv1": pb2.V1LayerParameter.CONVOLUTION, "ip1": pb2.V1LayerParameter.INNER_PRODUCT,
             "ip2": pb2.V1LayerParameter.INNER_PRODUCT}
    for name, shapes in V1_SHAPES.items():
        layer = net.layers.add(name=name, type=types[name])
        for shape in shapes:
            num, channels, height, width = (1,) * (4 - len(shape)) + shape
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            values = rng.normal(0, 1 / np.sqrt(fan_in), int(np.prod(shape))).astype(np.float32)
            layer.blobs.add(num=num, channels=channels, height=height, width=width, data=values.tolist())
    path.write_bytes(net.SerializeToString())


def test_v1_model_is_upgraded_by_caffe_and_compressed(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "deploy.prototxt").write_text(V1_LENET)
    write_v1_caffemodel(user / "lenet.caffemodel")
    before = {p.name: p.read_bytes() for p in user.iterdir()}

    report = zoo.run(zoo_config(user / "deploy.prototxt", user / "lenet.caffemodel", tmp_path / "out", p=0.05,
                                   bits=8, batch=64, progress=False), log=lambda m: None)

    assert report["upgraded"] == {"prototxt": True, "caffemodel": True, "legacy_blob_shapes": True,
                                  "train_val": False}
    listed = zoo.list_compressible(zoo_config(user / "deploy.prototxt", user / "lenet.caffemodel", tmp_path / "l"))
    assert [(row.name, row.type, row.weight_shape) for row in listed] == [
        ("conv1", "Convolution", (20, 1, 5, 5)), ("ip1", "InnerProduct", (50, 2880)), ("ip2", "InnerProduct", (10, 50))]
    assert report["used"]["deploy"] == str(tmp_path / "out" / "upgraded" / "deploy.prototxt")
    assert caffe_io.read_net_param(report["used"]["deploy"]).layer[0].type == "Input"
    assert [row["layer"] for row in report["layers"]] == ["conv1", "ip1", "ip2", "Overall"]
    assert report["comparison"]["top1_agreement"] >= 0.9  # random weights: near-tied logits, so a small p
    assert report["size"]["rate"] > 3
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before  # the user's files are only read


def test_upgraded_v1_model_computes_what_caffe_computes_from_the_v1_files(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(V1_LENET)
    write_v1_caffemodel(tmp_path / "lenet.caffemodel")
    cfg = zoo_config(tmp_path / "deploy.prototxt", tmp_path / "lenet.caffemodel", tmp_path / "out", p=0.3,
                        bits=8)
    files = zoo.prepare(cfg)
    inputs = zoo.random_inputs(files["shapes"].inputs, 8, seed=1)
    direct = zoo.forward(tmp_path / "deploy.prototxt", tmp_path / "lenet.caffemodel", inputs, 8)  # Caffe upgrades
    upgraded = zoo.forward(files["deploy"], files["weights"], inputs, 8)
    np.testing.assert_array_equal(direct["prob"], upgraded["prob"])


def test_truncated_v1_caffemodel_is_refused_by_the_upgrade(tmp_path):
    write_v1_caffemodel(tmp_path / "lenet.caffemodel")
    data = (tmp_path / "lenet.caffemodel").read_bytes()
    (tmp_path / "lenet.caffemodel").write_bytes(data[:len(data) // 2])
    with pytest.raises(ClipqError, match="lenet.caffemodel: Caffe.s upgrade_net_proto_binary failed"):
        zoo.prepare_weights(tmp_path / "lenet.caffemodel", tmp_path / "out")


# --- a net with two inputs ----------------------------------------------------------------------------

def two_input_deploy(path: Path) -> None:
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.image = L.Input(shape=dict(dim=[4, 1, 8, 8]))
    n.extra = L.Input(shape=dict(dim=[4, 6]))
    n.conv = L.Convolution(n.image, num_output=4, kernel_size=3)
    n.fc_image = L.InnerProduct(n.conv, num_output=5)
    n.fc_extra = L.InnerProduct(n.extra, num_output=5)
    n.sum = L.Eltwise(n.fc_image, n.fc_extra)
    n.prob = L.Softmax(n.sum)
    path.write_text(str(n.to_proto()))


def test_every_input_of_a_multi_input_net_is_filled(tmp_path):
    two_input_deploy(tmp_path / "deploy.prototxt")
    random_caffemodel(tmp_path / "deploy.prototxt", tmp_path / "w.caffemodel", std=0.3)
    cfg = zoo_config(tmp_path / "deploy.prototxt", tmp_path / "w.caffemodel", tmp_path / "out", p=0.95, bits=1,
                        batch=32, progress=False)
    files = zoo.prepare(cfg)
    assert files["shapes"].inputs == {"image": (4, 1, 8, 8), "extra": (4, 6)}
    inputs = zoo.random_inputs(files["shapes"].inputs, 32, seed=0)
    without_extra = dict(inputs, extra=np.zeros_like(inputs["extra"]))
    out = zoo.forward(files["deploy"], files["weights"], inputs, 16)["prob"]
    assert out.shape == (32, 5) and not np.allclose(out, zoo.forward(files["deploy"], files["weights"],
                                                                      without_extra, 16)["prob"])
    report = zoo.run(cfg, log=lambda m: None)
    assert report["comparison"]["samples"] == 32


def test_npz_inputs_name_every_input_blob(tmp_path):
    np.savez(tmp_path / "x.npz", image=np.ones((3, 1, 8, 8)), other=np.ones((3, 6)))
    with pytest.raises(ClipqError, match="the net's inputs are image, extra"):
        zoo.load_inputs(tmp_path / "x.npz", {"image": (4, 1, 8, 8), "extra": (4, 6)})


def one_class_report(mild: dict, random_inputs: bool) -> dict:
    report = json.loads(json.dumps(mild))
    report["comparison"].update(original_classes=1, compared=64, random_inputs=random_inputs)
    return report


def agreement_line(report: dict) -> str:
    return next(line for line in zoo.summary_lines(report) if line.startswith("top-1 agreement"))


def test_one_class_on_random_inputs_asks_for_real_inputs(mild):
    assert "give real inputs with --inputs" in agreement_line(one_class_report(mild, random_inputs=True))


def test_one_class_on_real_inputs_says_so_without_asking_for_them(mild):
    line = agreement_line(one_class_report(mild, random_inputs=False))
    assert "all inputs got one class" in line and "--inputs" not in line
