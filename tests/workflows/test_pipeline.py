"""`clipq compress` end to end on a Fashion-MNIST slice: every stage in real Caffe, resumable; the
held-out protocol and the accuracy budget's rounds (met, unreachable, resumed mid-round)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipq.caffe import caffe_io, caffemodel, nets, train
from clipq.methods.dns import Surgery
from clipq.search.gp import SearchSettings
from clipq.storage import sparse_codec
from clipq.util.errors import ClipqError
from clipq.workflows import pipeline
from conftest import SOLVER

QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def mlp(trained_mlp, tmp_path_factory):
    """The shared trained MLP with a fine-tuning solver that also tests (on --val when given)."""
    solver = tmp_path_factory.mktemp("solver") / "finetune.prototxt"
    solver.write_text(trained_mlp["solver"].read_text() + "test_iter: 3\ntest_interval: 1000\n")
    return {**trained_mlp, "solver": solver}


def config(mlp, out, **kwargs) -> pipeline.CompressConfig:
    settings = kwargs.pop("settings", SearchSettings(iterations=4, initial=3, subset=500))
    return pipeline.CompressConfig(mlp["model"], mlp["weights"], mlp["solver"], out, settings=settings, jobs=2,
                                   progress=False, **kwargs)


def test_compress_end_to_end_decoded_model_scores_like_the_clipq_net(tmp_path, mlp):
    cfg = config(mlp, tmp_path / "out")
    report = pipeline.run(cfg, **QUIET)

    accuracy = report["accuracy"]
    assert accuracy["decoded"] == accuracy["clipq_net"]
    assert accuracy["baseline"] > 0.7 and accuracy["decoded"] > 0.25  # chance is 0.10; 4 evaluations per layer
    assert report["size"]["clipq_file_bytes"] == (tmp_path / "out" / "model.clipq").stat().st_size
    assert [row["layer"] for row in report["layers"]] == ["ip1", "ip2", "ip3", "Overall"]
    assert sorted(Path(p).name for p in report["plots"]) == ["ip1.png", "ip2.png", "ip3.png", "net.png"]
    assert report["val_accuracy"] is None and "TRAIN LMDB" in report["data"]["search"]
    assert "| **Overall** |" in (tmp_path / "out" / "report.md").read_text()

    messages = []
    pipeline.run(cfg, log=messages.append)
    assert messages and all(m.endswith("up to date, skipped") for m in messages)


def test_with_val_the_search_and_the_fine_tuning_monitor_see_only_the_validation_images(tmp_path, mlp):
    report = pipeline.run(config(mlp, tmp_path, val=mlp["val"], plan=None), **QUIET)
    head = json.loads((tmp_path / "search" / "ip1.jsonl").read_text().splitlines()[0])
    assert head["data"] == str(mlp["val"].resolve())
    assert "validation LMDB" in report["data"]["search"]
    finetuned = (tmp_path / "clipq_finetune_train_val.prototxt").read_text()
    assert str(mlp["val"].resolve()) in finetuned and str(tmp_path / "train_order_seed0_lmdb") in finetuned
    assert 'test_iter: 10' in (tmp_path / "finetune_solver.prototxt").read_text()  # 1000 val images / batch 100
    assert report["val_accuracy"]["images"] == 1000
    assert 0 < report["val_accuracy"]["baseline_on_training_images"] <= 1  # on 1,000 training images
    assert caffe_io.lmdb_entries(tmp_path / "train_sample_1000_lmdb") == 1000
    assert report["val_accuracy"]["decoded"] == pytest.approx(np.load(tmp_path / "val_correct.npy").mean())


def training_order(config) -> list[bytes]:
    """The Datums of the fine-tuning's TRAIN LMDB, in the order Caffe reads them."""
    import lmdb

    nets = pipeline.prepare_nets(config, log=lambda m: None)
    source = caffe_io.test_data_layer(caffe_io.read_net_param(nets.train), "net", "TRAIN").data_param.source
    with lmdb.open(source, readonly=True, lock=False) as env, env.begin() as txn:
        return [value for _, value in txn.cursor()]


def test_the_seed_orders_the_fine_tunings_training_images(tmp_path, mlp):
    for name in "abc":
        (tmp_path / name).mkdir()
    seed0 = training_order(config(mlp, tmp_path / "a", settings=SearchSettings(seed=0)))
    again = training_order(config(mlp, tmp_path / "b", settings=SearchSettings(seed=0)))
    seed1 = training_order(config(mlp, tmp_path / "c", settings=SearchSettings(seed=1)))
    assert seed0 == again and seed0 != seed1 and sorted(seed0) == sorted(seed1)  # the same images, reordered


def finetune_init(out, number: str) -> str:
    """The weights a round's fine-tuning started from (its recorded inputs, whatever Caffe logs)."""
    return json.loads((out / "rounds" / number / "finetune" / "inputs.json").read_text())["init"]


def test_a_budget_that_is_met_gives_the_smallest_round_that_met_it(tmp_path, mlp):
    report = pipeline.run(config(mlp, tmp_path, val=mlp["val"], max_drop=60.0, rounds=2), **QUIET)
    budget = report["budget"]
    rounds = budget["rounds"]
    assert budget["met"] and len(rounds) == 2 and all(r["met"] for r in rounds)
    assert rounds[1]["clipq_bytes"] < rounds[0]["clipq_bytes"]  # a met budget moves to smaller plans
    assert budget["chosen"] == 2
    assert (tmp_path / "final_model.clipq").read_bytes() == (tmp_path / "rounds" / "02" / "model.clipq").read_bytes()
    assert report["size"]["clipq_file_bytes"] == rounds[1]["clipq_bytes"]
    # the fine-tuning of round 2 starts from round 1's full-precision weights
    assert finetune_init(tmp_path, "02") == pipeline.file_id(tmp_path / "rounds" / "01" / "finetuned.caffemodel")
    text = (tmp_path / "report.md").read_text()
    assert "## Accuracy budget" in text and "round 2 is the smallest model" in text
    assert (tmp_path / "plots" / "budget.png").stat().st_size > 0


def test_an_unreachable_budget_is_reported_as_missed_and_keeps_the_smallest_drop(tmp_path, mlp):
    # a margin of 1000 standard errors: no round can meet it
    report = pipeline.run(config(mlp, tmp_path, val=mlp["val"], max_drop=0.01, se_margin=1000, rounds=2), **QUIET)
    budget = report["budget"]
    assert not budget["met"] and not any(r["met"] for r in budget["rounds"])
    assert budget["rounds"][1]["clipq_bytes"] > budget["rounds"][0]["clipq_bytes"]  # a miss moves to larger plans
    best = min(budget["rounds"], key=lambda r: r["val_drop"])
    assert budget["chosen"] == best["round"]
    # no round met the budget, so every round started from the baseline weights, not from a failed round
    assert finetune_init(tmp_path, "02") == pipeline.file_id(mlp["weights"])
    assert "NO round met the budget" in (tmp_path / "report.md").read_text()


def test_a_run_stopped_inside_a_round_resumes_there_with_the_same_result(tmp_path, mlp):
    cfg = config(mlp, tmp_path, val=mlp["val"], max_drop=60.0, rounds=2)
    first = pipeline.run(cfg, **QUIET)
    # as if stopped after round 2's fine-tuning: its encode, decode and evaluation never happened
    for name in ("model.clipq", "decoded.caffemodel", "val_correct.npy"):
        (tmp_path / "rounds" / "02" / name).unlink()
    shutil.rmtree(tmp_path / "rounds" / "02" / "finetune")
    messages = []
    again = pipeline.run(cfg, log=messages.append)
    redone = [m for m in messages if m.endswith("...")]
    assert redone == ["[encode] ...", "[decode] ...", "[evaluate] ..."]
    assert again["budget"] == first["budget"]


def test_a_layer_a_method_pruned_entirely_is_stored_with_no_rate(tmp_path):
    # DNS and LC decide their own sparsity: the header's p is the share of zeros, and 1 is no pruning rate
    w = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    mask, state = np.zeros_like(w), np.zeros(3, np.float32)
    trained = tmp_path / "dns.caffemodel"
    caffemodel.write([caffemodel.LayerWeights("fc", "Python", [w, np.ones(4, np.float32), mask, state])], trained)
    plain = caffe_io.caffe_pb2().NetParameter()
    plain.layer.add(name="fc", type="InnerProduct")
    method = Surgery("dns", {}, bias={"fc": True}, c_rates={"fc": 1.0})
    _, (layer,) = sparse_codec.decode(sparse_codec.encode(pipeline.method_layers(method, trained, plain)))
    assert layer.p is None and not layer.codes.any() and np.array_equal(layer.blobs[1], np.ones(4))


def test_budget_settings_are_checked_before_any_stage(tmp_path, mlp):
    with pytest.raises(ClipqError, match="--max-drop needs --val"):
        pipeline.run(config(mlp, tmp_path / "a", max_drop=0.5), **QUIET)
    with pytest.raises(ClipqError, match="--search-on val needs --val"):
        pipeline.run(config(mlp, tmp_path / "b", search_on="val"), **QUIET)
    with pytest.raises(ClipqError, match="cannot be combined with --plan"):
        pipeline.run(config(mlp, tmp_path / "c", val=mlp["val"], max_drop=0.5, plan=mlp["model"]), **QUIET)
    with pytest.raises(ClipqError, match="cannot open the validation LMDB"):
        pipeline.run(config(mlp, tmp_path / "d", val=tmp_path / "nowhere"), **QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_an_overfit_baseline_searched_on_held_out_data_keeps_its_budget_on_the_test_set(tmp_path):
    """LeNet-5 trained on 2,000 images to ~zero training loss: on training images every (p, b) looks free,
    so the paper's training-subset error cannot steer; held-out search with --max-drop 1 must hold on test."""
    from clipq.caffe import caffe_io
    from clipq.data import datasets
    train_split = datasets.load_split(datasets.DEBIAN_SOURCE, "train")
    test_split = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    for name, split, start, n in (("train", train_split, 0, 2000), ("val", train_split, 55000, 2000),
                                  ("test", test_split, 0, 10000)):
        datasets.write_lmdb(datasets.Split(split.images[start:start + n], split.labels[start:start + n]),
                            tmp_path / name)
    data = nets.DataSpec(str(tmp_path / "train"), str(tmp_path / "test"), 64, 100, (100, 1, 28, 28), scale=1 / 256)
    model = tmp_path / "train_val.prototxt"
    model.write_text(str(nets.train_val("lenet5", nets.lenet5_body, data)))
    (tmp_path / "base.prototxt").write_text(
        SOLVER.format(net=model, lr=0.01, iters=2000, prefix=tmp_path / "b" / "l") + "display: 500\n")
    weights = train.train(tmp_path / "base.prototxt", progress=False)
    top1 = {}
    for name in ("train", "val"):  # over-fit: the training images (almost) learned by heart, held-out ones not
        on = tmp_path / f"on_{name}.prototxt"
        on.write_text(str(caffe_io.with_test_source(caffe_io.read_net_param(model), tmp_path / name, str(model))))
        top1[name] = caffe_io.evaluate(on, weights, iterations=20)["accuracy"]
    assert top1["train"] > 0.97 and top1["train"] - top1["val"] > 0.1, top1
    solver = tmp_path / "finetune.prototxt"
    solver.write_text(SOLVER.format(net="replaced", lr=0.001, iters=300, prefix="replaced"))

    cfg = pipeline.CompressConfig(model, weights, solver, tmp_path / "out", jobs=2, progress=False,
                                  settings=SearchSettings(lam=1000, iterations=12, initial=5, subset=2000),
                                  val=tmp_path / "val", max_drop=1.0, rounds=3)
    report = pipeline.run(cfg, **QUIET)
    assert report["budget"]["met"]
    assert 100 * (report["accuracy"]["baseline"] - report["accuracy"]["decoded"]) <= 1.0
    assert report["size"]["rate"] > 5
    assert caffe_io.lmdb_entries(tmp_path / "test") == 10000


def test_fine_tuning_aids_distil_from_the_baseline_ramp_p_and_count_epochs(tmp_path, mlp):
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers: {ip1: {p: 0.8, b: 3}, ip2: {p: 0.5, b: 4}, ip3: {p: 0.3, b: 5}}\n")
    aids = pipeline.Aids(epochs=0.05, ramp=0.5, distill=2.0, distill_weight=0.5)
    report = pipeline.run(config(mlp, tmp_path / "out", plan=plan, aids=aids), **QUIET)
    out = tmp_path / "out"
    assert "max_iter: 5\n" in (out / "finetune_solver.prototxt").read_text()  # 0.05 x 6,000 images / batch 64
    net = caffe_io.read_net_param(out / "clipq_finetune_train_val.prototxt")
    ramps = {layer.name: json.loads(layer.python_param.param_str).get("ramp") for layer in net.layer
             if layer.python_param.layer.startswith("ClipQ")}
    assert ramps == {"ip1": 2, "ip2": 2, "ip3": 2}  # half of the 5 iterations, rounded
    assert [layer.name for layer in net.layer if layer.name.startswith("teacher/")][-1] == "teacher/ip3"
    assert [row["layer"] for row in report["layers"]] == ["ip1", "ip2", "ip3", "Overall"]  # no teacher stored
    trained = {w.name: w.blobs for w in caffemodel.read(out / "finetuned.caffemodel")}
    baseline = {w.name: w.blobs for w in caffemodel.read(mlp["weights"])}
    assert np.array_equal(trained["teacher/ip1"][0], baseline["ip1"][0])
    assert report["accuracy"]["decoded"] == report["accuracy"]["clipq_net"]


def test_max_iter_and_epochs_together_are_refused(tmp_path, mlp):
    with pytest.raises(ClipqError, match="--max-iter or --finetune-epochs"):
        pipeline.run(config(mlp, tmp_path / "o", max_iter=5, aids=pipeline.Aids(epochs=1.0)), **QUIET)


def onnx_and_caffe_right(onnx_file: Path, train_val: Path, weights: Path) -> tuple[int, int, int]:
    """(images, right in onnxruntime, right in Caffe): onnxruntime fed the very images Caffe's own Data layer
    gives the net, batch by batch, and both argmaxes checked against its labels."""
    import onnxruntime as ort

    net_param = caffe_io.read_net_param(train_val)
    scores, labels = caffe_io.top1_blobs(net_param, str(train_val))
    data = caffe_io.test_data_layer(net_param, str(train_val))
    entries = caffe_io.lmdb_entries(data.data_param.source)
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(train_val), str(weights), cf.TEST)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_right = caffe_right = 0
    for _ in range(entries // data.data_param.batch_size):  # the fixture's 1,000 test images: 10 whole batches
        net.forward()
        truth = net.blobs[labels].data.astype(int)
        ours = session.run([scores], {data.top[0]: net.blobs[data.top[0]].data})[0]
        onnx_right += int(np.sum(ours.argmax(axis=1) == truth))
        caffe_right += int(np.sum(net.blobs[scores].data.argmax(axis=1) == truth))
    return entries, onnx_right, caffe_right


def test_the_final_model_is_written_as_onnx_scoring_caffes_test_top1_in_onnxruntime(tmp_path, mlp):
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers: {ip1: {p: 0.8, b: 3}, ip2: {p: 0.5, b: 4}, ip3: {p: 0.3, b: 5}}\n")
    out = tmp_path / "out"
    report = pipeline.run(config(mlp, out, plan=plan, max_iter=5, onnx=False), **QUIET)
    assert report["onnx"] is None and not list(out.glob("*.onnx"))
    assert "- ONNX: not written (--no-onnx)" in (out / "report.md").read_text()

    # the same directory with the ONNX stage, as a run made before it existed resumes: only that stage runs
    messages = []
    report = pipeline.run(config(mlp, out, plan=plan, max_iter=5), log=messages.append)
    assert [m for m in messages if m.endswith("...")] == ["[onnx] ..."]
    onnx = report["onnx"]
    assert onnx["file"] == str(out / "model.onnx") and onnx["bytes"] == (out / "model.onnx").stat().st_size
    assert onnx["compressed"] == {"ip1": "UINT8", "ip2": "UINT8", "ip3": "UINT8"}
    assert onnx["bytes"] < onnx["dense_bytes"] / 3
    top1 = onnx["top1"]
    assert top1["images"] == 1000 and top1["equal"] and top1["differing_images"] == 0
    assert top1["onnx"] == top1["caffe"] == pytest.approx(report["accuracy"]["decoded"], abs=1e-6)
    # not through clipq's own reading of the LMDB: the images Caffe's Data layer makes, into onnxruntime
    images, onnx_right, caffe_right = onnx_and_caffe_right(out / "model.onnx", out / "plain_train_val.prototxt",
                                                           out / "decoded.caffemodel")
    assert images == 1000 and onnx_right == caffe_right == top1["onnx_correct"]
    line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("- ONNX"))
    assert f"`model.onnx` {onnx['bytes']:,} bytes" in line and f"**{top1['caffe']:.4f}** (equal;" in line

    messages = []
    pipeline.run(config(mlp, out, plan=plan, max_iter=5), log=messages.append)
    assert messages and all(m.endswith("up to date, skipped") for m in messages)


def test_a_fine_tuning_that_ends_with_nan_weights_is_refused_as_diverged(tmp_path, trained_mlp):
    from clipq.methods.clipq import ClipQ
    from clipq.plan import LayerPlan
    layers = caffemodel.read(trained_mlp["weights"])
    for layer in layers:
        if layer.name == "ip1":
            layer.blobs[0] = layer.blobs[0].copy()
            layer.blobs[0][0, 0] = np.nan
    diverged = tmp_path / "diverged.caffemodel"
    caffemodel.write(layers, diverged)
    method = ClipQ("clipq", {}, plan={"ip1": LayerPlan(0.5, 4)}, bias={"ip1": True})
    with pytest.raises(pipeline.Diverged, match="ip1 has NaN or Inf values: the fine-tuning diverged"):
        pipeline.method_layers(method, diverged, caffe_io.read_net_param(trained_mlp["model"]))
