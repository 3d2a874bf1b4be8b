"""The paper's nets: solvers mirror the paper's schedules, zoo-shaped weights load into the plain and the
CLIP-Q nets, and (slow tier) every stage of `clipq reproduce --smoke` runs end to end."""

from __future__ import annotations

import pytest

from clipq.caffe import caffe_io, convert
from clipq.plan import load_plan
from clipq.workflows import reproduce
from conftest import random_caffemodel, require_opencv

SCHEDULES = {  # the paper's section 4: (max_iter, base_lr, lr_policy, train batch)
    "alexnet": (900_000, 0.001, "step", 256),
    "googlenet": (2_400_000, 1e-5, "poly", 32),
    "resnet50": (250_000, 1e-4, "multistep", 24),
}


@pytest.mark.parametrize("net", reproduce.NETS)
def test_solvers_mirror_the_papers_schedules(net):
    train_val, _, _, solver = reproduce.paper_files(net)
    param = caffe_io.read_text_proto(solver, "SolverParameter", "solver")
    max_iter, base_lr, policy, batch = SCHEDULES[net]
    assert (param.max_iter, param.lr_policy) == (max_iter, policy)
    assert param.base_lr == pytest.approx(base_lr)
    train = [layer for layer in caffe_io.read_net_param(train_val).layer if layer.name == "data"][0]
    assert train.data_param.batch_size == batch


def test_alexnet_steps_every_400k_and_resnet_once_at_100k():
    alexnet = caffe_io.read_text_proto(reproduce.paper_files("alexnet")[3], "SolverParameter", "solver")
    resnet = caffe_io.read_text_proto(reproduce.paper_files("resnet50")[3], "SolverParameter", "solver")
    assert (alexnet.stepsize, alexnet.gamma) == (400_000, pytest.approx(0.1))
    assert list(resnet.stepvalue) == [100_000]


@pytest.mark.parametrize("net", reproduce.NETS)
def test_zoo_shaped_weights_load_into_plain_and_clipq_nets(net, tmp_path):
    _, deploy, params, _ = reproduce.paper_files(net)
    zoo = random_caffemodel(deploy, tmp_path / "zoo.caffemodel", std=0.01)
    clipq_deploy = tmp_path / "clipq_deploy.prototxt"
    clipq_deploy.write_text(str(convert.to_clipq(caffe_io.read_net_param(deploy), load_plan(params))))
    cf = caffe_io.caffe()
    clipq_net = cf.Net(str(clipq_deploy), str(tmp_path / "zoo.caffemodel"), cf.TEST)
    assert list(clipq_net.params) == list(zoo.params)
    for name in load_plan(params):
        assert (clipq_net.params[name][0].data == zoo.params[name][0].data).all()


@pytest.mark.slow
@pytest.mark.parametrize("net", reproduce.NETS)
def test_smoke_run_goes_through_every_stage(net, tmp_path):
    report = reproduce.run(net, tmp_path, smoke=True, jobs=2, progress=False, log=lambda m: None)
    assert set(report["seconds"]) == {"baseline", "search", "convert", "convert-finetune", "finetune", "encode",
                                      "decode", "evaluate", "onnx"}
    assert report["accuracy"]["decoded"] == report["accuracy"]["clipq_net"]
    assert report["size"]["rate"] > 1
    assert (tmp_path / "finetune" / "clipq_iter_2.caffemodel").exists()
    assert "SYNTHETIC data" in (tmp_path / "report.md").read_text()


def test_smoke_imagenet_is_made_from_jpegs_by_caffes_tools(tmp_path):
    from clipq.caffe import caffe_io, preflight
    require_opencv("the smoke run uses random arrays")
    out = reproduce.jpeg_imagenet(tmp_path)
    assert preflight.first_datum(out / reproduce.TRAIN_LMDB, "x") == (3, 256, 256)
    assert caffe_io.lmdb_entries(out / reproduce.VAL_LMDB) == reproduce.SMOKE["images"][1]
    assert (out / reproduce.MEAN_FILE).stat().st_size > 3 * 256 * 256 * 4
    model = reproduce.train_val_for(reproduce.paper_files("alexnet")[0], out, tmp_path, batch=2)
    transform = caffe_io.read_net_param(model).layer[0].transform_param
    assert transform.mean_file.endswith(reproduce.MEAN_FILE) and not len(transform.mean_value)
