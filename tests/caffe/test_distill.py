"""Distillation inside Caffe: the soft-target loss and its gradient against numpy, the frozen teacher copy, and a
distilled fine-tuning whose teacher ends as it started."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, caffemodel, distill, train
from clipq.util.errors import ClipqError
from conftest import SOLVER


def test_soft_target_loss_is_t_squared_kl_and_its_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    student, teacher, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), 3.0
    loss, grad = distill.soft_target_loss(student, teacher, t)
    p = np.exp(teacher / t) / np.exp(teacher / t).sum(axis=1, keepdims=True)
    q = np.exp(student / t) / np.exp(student / t).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(t * t * np.mean(np.sum(p * np.log(p / q), axis=1)))
    eps, numeric = 1e-6, np.zeros_like(student)
    for index in np.ndindex(student.shape):
        bumped = student.copy()
        bumped[index] += eps
        numeric[index] = (distill.soft_target_loss(bumped, teacher, t)[0] - loss) / eps
    assert np.allclose(grad, numeric, atol=1e-4)
    assert distill.soft_target_loss(teacher, teacher, t)[0] == pytest.approx(0, abs=1e-12)


def teacher_net(trained_mlp, temperature=2.0, weight=0.5):
    net = caffe_io.read_net_param(trained_mlp["model"])
    counts = {w.name: len(w.blobs) for w in caffemodel.read(trained_mlp["weights"])}
    return distill.with_teacher(net, counts, temperature, weight, "mlp")


def test_the_teacher_is_a_frozen_train_phase_copy_reading_the_same_data(trained_mlp):
    net = teacher_net(trained_mlp)
    teachers = [layer for layer in net.layer if distill.is_teacher(layer.name)]
    assert [layer.name for layer in teachers] == ["teacher/ip1", "teacher/relu1", "teacher/ip2", "teacher/relu2",
                                                  "teacher/ip3"]
    assert teachers[0].bottom[0] == "data" and teachers[-1].top[0] == "teacher/ip3"
    assert all(p.lr_mult == 0 and p.decay_mult == 0 for layer in teachers for p in layer.param)
    assert [len(layer.param) for layer in teachers] == [2, 0, 2, 0, 2]
    loss = net.layer[-1]
    assert (loss.python_param.layer, list(loss.bottom), list(loss.loss_weight), list(loss.propagate_down)) == (
        "SoftTargetLoss", ["ip3", "teacher/ip3"], [0.5], [True, False])


def test_a_net_without_a_softmax_loss_cannot_be_distilled(trained_mlp):
    net = caffe_io.read_net_param(trained_mlp["model"])
    for layer in net.layer:
        if layer.type == "SoftmaxWithLoss":
            layer.type = "EuclideanLoss"
    with pytest.raises(ClipqError, match="distillation needs a SoftmaxWithLoss layer"):
        distill.with_teacher(net, {}, 2.0, 1.0, "mlp")


def test_a_distilled_fine_tuning_trains_the_student_and_leaves_the_teacher_as_it_was(trained_mlp, tmp_path):
    (tmp_path / "net.prototxt").write_text(str(teacher_net(trained_mlp)))
    start = tmp_path / "start.caffemodel"
    baseline = caffemodel.read(trained_mlp["weights"])
    student = [caffemodel.LayerWeights(w.name, w.type, [b * 0.5 for b in w.blobs]) for w in baseline]
    caffemodel.write(student + distill.teacher_layers(trained_mlp["weights"]), start)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER.format(net=tmp_path / "net.prototxt", lr=0.01, iters=5, prefix=tmp_path / "s"))
    trained = {w.name: w.blobs for w in caffemodel.read(train.train(solver, weights=start, progress=False))}
    for w in baseline:
        if w.blobs:
            assert all(np.array_equal(a, b) for a, b in zip(trained["teacher/" + w.name], w.blobs))
    ip1 = next(w for w in baseline if w.name == "ip1")
    assert not np.allclose(trained["ip1"][0], 0.5 * ip1.blobs[0])  # the student learned
