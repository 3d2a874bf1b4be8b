"""`clipq init`: a deploy + a data directory -> a train_val and solvers that real Caffe runs as written,
and the inputs a deploy cannot take refused before Caffe sees them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipq.caffe import caffe_io
from clipq.data import data_import, experiment, image_sources
from clipq.util.errors import ClipqError

RNG = np.random.default_rng(2)


def make_data(path, count: int, shape: tuple[int, int, int], classes: int = 10, test: float = 0.2):
    images = RNG.integers(0, 256, (count,) + shape, dtype=np.uint8)
    labels = np.arange(count) % classes
    examples = [image_sources.Example(f"i{i}", int(label), lambda i=i: images[i]) for i, label in enumerate(labels)]
    source = image_sources.Source("npz", examples, [str(c) for c in range(classes)])
    data_import.import_images(source, path, data_import.ImportSettings(val=0.1, test=test), progress=False)
    return path


def test_test_batch_divides_the_test_set():
    assert experiment.test_batch(1000) == 100
    assert experiment.test_batch(510) == 85
    assert experiment.test_batch(97) == 97
    assert experiment.test_batch(1009) == 1  # a prime: one image per batch, still exactly once


def test_lenet5_experiment_runs_in_caffe_as_written(tmp_path, repo):
    data = make_data(tmp_path / "data", 500, (1, 28, 28))
    exp, notes = experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")
    assert "input transform: scale 0.00390625" in notes
    solver = caffe_io.read_text_proto(exp["solver"], "SolverParameter", "solver")
    net_param = caffe_io.read_net_param(exp["train_val"])
    test_layer = caffe_io.test_data_layer(net_param, "x")
    assert solver.test_iter[0] * test_layer.data_param.batch_size == exp["counts"]["test"] == 100
    assert [layer.name for layer in net_param.layer if layer.type == "Accuracy"] == ["accuracy", "accuracy_top5"]
    cf = caffe_io.caffe()
    train = cf.Net(exp["train_val"], cf.TRAIN)
    out = train.forward()
    assert train.blobs["data"].data.shape == (64, 1, 28, 28) and np.isfinite(out["loss"])
    assert train.blobs["data"].data.max() <= 1.0  # scaled by 1/256, as Caffe's LeNet


def test_colour_images_larger_than_the_input_are_cropped_and_mean_subtracted(tmp_path, repo):
    data = make_data(tmp_path / "data", 60, (3, 40, 40), classes=3)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n'
                      'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                      'inner_product_param { num_output: 1000 } }\n'
                      'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    exp, notes = experiment.init(deploy, data, tmp_path / "exp")
    assert any("'fc' has 1000 outputs, the data 3 classes" in note for note in notes)
    transform = caffe_io.read_net_param(exp["train_val"]).layer[0].transform_param
    assert transform.crop_size == 32 and transform.mean_file.endswith("mean.binaryproto")
    cf = caffe_io.caffe()
    net = cf.Net(exp["train_val"], cf.TEST)
    net.forward()
    assert net.blobs["data"].data.shape[1:] == (3, 32, 32) and "fc_3cls" in net.params
    assert net.params["fc_3cls"][0].data.shape[0] == 3


def test_images_too_small_for_the_net_are_refused_naming_the_layer(tmp_path, repo):
    data = make_data(tmp_path / "data", 100, (1, 8, 8))
    message = r"deploy.prototxt: layer 'conv2' .* empty blob.*data 64x1x8x8.*1x8x8.*--resize"
    with pytest.raises(ClipqError, match=message):
        experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_channel_mismatch_says_how_to_remake_the_data(tmp_path, repo):
    data = make_data(tmp_path / "data", 50, (3, 28, 28))
    with pytest.raises(ClipqError, match="3 channel.*deploy's input 1.*--gray"):
        experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")


def test_caffe_lmdbs_without_dataset_json_are_accepted(tmp_path, repo):
    data = make_data(tmp_path / "data", 200, (1, 28, 28))
    (data / "dataset.json").unlink()
    (data / "mean.binaryproto").unlink()
    exp, _ = experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")
    assert exp["val_lmdb"].endswith("val_lmdb")
    with pytest.raises(ClipqError, match="already exists"):
        experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")


def test_without_dataset_json_the_labels_set_the_classes(tmp_path, repo):
    data = make_data(tmp_path / "data", 200, (1, 28, 28), classes=12)  # LeNet-5's deploy has 10 outputs
    (data / "dataset.json").unlink()
    exp, notes = experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")
    assert any("'ip2' has 10 outputs, the data 12 classes" in note for note in notes)


def test_a_dataset_json_listing_fewer_classes_than_the_labels_is_refused(tmp_path, repo):
    data = make_data(tmp_path / "data", 200, (1, 28, 28), classes=12)
    description = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**description, "classes": description["classes"][:10]}))
    with pytest.raises(ClipqError, match=r"dataset.json: lists 10 classes, but the LMDBs have labels up to 11"):
        experiment.init(repo / "prototxt/lenet5/deploy.prototxt", data, tmp_path / "exp")


def test_a_net_whose_scores_are_fewer_than_the_classes_is_refused(tmp_path, repo):
    data = make_data(tmp_path / "data", 60, (1, 8, 8), classes=6)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('input: "data" input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }\n'
                      'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                      'convolution_param { num_output: 4 kernel_size: 8 } }\n')
    with pytest.raises(ClipqError, match="output 'conv' has 4 value.*the data has 6 classes"):
        experiment.init(deploy, data, tmp_path / "exp")


def test_from_a_csv_to_a_compressed_model_in_four_commands(tmp_path, repo, capsys):
    """docs/own_data.md's route: clipq data, clipq init, clipq train, clipq compress --experiment (tiny budgets)."""
    from clipq import cli
    from clipq.data import datasets
    split = datasets.lmdb_split(datasets.DEBIAN_SOURCE, "train", limit=300)
    rows = [",".join(map(str, [label] + image.ravel().tolist())) for image, label in zip(split.images, split.labels)]
    (tmp_path / "digits.csv").write_text("\n".join(rows) + "\n")
    data, exp = tmp_path / "data", tmp_path / "exp"
    assert cli.main(["data", str(tmp_path / "digits.csv"), "--out", str(data), "--no-progress"]) == 0
    assert cli.main(["init", "--deploy", str(repo / "prototxt/lenet5/deploy.prototxt"), "--data", str(data),
                     "--out", str(exp), "--epochs", "1", "--finetune-epochs", "1", "--min-iter", "20"]) == 0
    assert cli.main(["train", "--solver", str(exp / "solver.prototxt"), "--output", str(exp / "baseline.caffemodel"),
                     "--no-progress"]) == 0
    assert cli.main(["compress", "--experiment", str(exp), "--plan", str(repo / "prototxt/lenet5/example_plan.yaml"),
                     "--no-progress"]) == 0
    report = (exp / "compress" / "report.md").read_text()
    assert "decoded" in report.lower() and (exp / "compress" / "model.clipq").exists()
    assert "![net](plots/net.png)" in report  # the net drawn by caffe.draw
    assert cli.main(["zoo", "--experiment", str(exp), "--p", "0.5", "--b", "6", "--max-iter", "2", "--no-progress",
                     "--format", "json"]) == 0
    assert (exp / "zoo" / "zoo_report.json").exists()
    capsys.readouterr()


def test_compress_without_experiment_names_the_missing_options(tmp_path, capsys):
    from clipq import cli
    assert cli.main(["compress", "--model", "m.prototxt"]) == 2
    assert "give --weights, --solver, --out (or --experiment DIR" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ('layer { name: "loss" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 10 } }',
     "layer 'loss' has a name clipq init gives its own layers"),
    ('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "label" inner_product_param { num_output: 10 } }',
     "layer 'fc' makes a blob named 'label'"),
    ('layer { name: "prob" type: "Softmax" bottom: "data" top: "prob" }', "no layer between the input and the output"),
    ('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 10 } }\n'
     'layer { name: "arg" type: "ArgMax" bottom: "fc" top: "arg" }', r"ends in layer 'arg' \(ArgMax\)"),
    ("", "no layers besides its input"),
], ids=["layer named loss", "blob named label", "input then softmax", "argmax", "input only"])
def test_a_deploy_caffe_would_abort_on_is_refused_naming_the_layer(tmp_path, body, message):
    data = make_data(tmp_path / "data", 60, (1, 8, 8), classes=10)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 8 '
                      f'dim: 8 }} }} }}\n{body}\n')
    with pytest.raises(ClipqError, match=message):
        experiment.init(deploy, data, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_a_damaged_mean_file_is_refused_before_caffe_reads_it(tmp_path, repo):
    data = make_data(tmp_path / "data", 60, (3, 32, 32), classes=3)
    (data / "mean.binaryproto").write_bytes(b"\x08\x01garbage")
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n'
                      'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                      'inner_product_param { num_output: 3 } }\n')
    with pytest.raises(ClipqError, match="mean.binaryproto: (not a Caffe BlobProto|a BlobProto of shape)"):
        experiment.init(deploy, data, tmp_path / "exp")
