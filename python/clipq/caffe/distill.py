"""Distillation from the uncompressed net during fine-tuning (Hinton, Vinyals & Dean 2015), inside Caffe.

The fine-tuning net gets a frozen copy of the plain net, the teacher: every layer of the TRAIN phase but the
data, loss, accuracy and dropout layers, named `teacher/<name>`, its blobs `teacher/<blob>`, reading the same
data blob; all its parameters have lr_mult 0 and decay_mult 0 and its BatchNorm layers use their global
statistics, so nothing about it changes while the student trains. A `SoftTargetLoss` Python layer
(layers/clipq_layers.py) adds

    T^2 * mean over images of KL(softmax(teacher / T) || softmax(student / T))

with the given loss weight to the net's own loss on the labels; no gradient reaches the teacher. The
teacher's weights are the baseline's, under the teacher's names, added to the fine-tuning's starting
caffemodel (`teacher_layers`). Pure protobuf and numpy: no pycaffe.
"""

from __future__ import annotations

import numpy as np

from clipq.caffe import caffe_io, caffemodel
from clipq.caffe.preflight import in_phase
from clipq.util.errors import ClipqError

PREFIX = "teacher/"
LOSS_LAYER = "distill"
SKIPPED = {"Data", "Input", "Accuracy", "Dropout", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss",
           "SigmoidCrossEntropyLoss", "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss", "Silence"}


def log_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(scores / T) over axis 1 (one row per image)."""
    scaled = np.asarray(scores, np.float64).reshape(len(scores), -1) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def soft_target_loss(student: np.ndarray, teacher: np.ndarray, temperature: float) -> tuple[float, np.ndarray]:
    """(T^2 * mean KL(softmax(teacher/T) || softmax(student/T)), its gradient with respect to `student`).
    The gradient, T (q - p) / N with p, q the teacher's and the student's softened distributions, is the one
    Hinton et al. scale by T^2 so that it keeps its size whatever the temperature."""
    p_log, q_log = log_softmax(teacher, temperature), log_softmax(student, temperature)
    p = np.exp(p_log)
    loss = temperature ** 2 * float(np.mean(np.sum(p * (p_log - q_log), axis=1)))
    grad = temperature * (np.exp(q_log) - p) / len(p)
    return loss, grad.reshape(np.shape(student)).astype(np.float32)


def scores_blob(net_param, source: str) -> str:
    """The class scores the loss is taken on: the first bottom of the net's TRAIN-phase SoftmaxWithLoss."""
    for layer in net_param.layer:
        if layer.type == "SoftmaxWithLoss" and in_phase(layer, "TRAIN"):
            return layer.bottom[0]
    raise ClipqError(f"{source}: distillation needs a SoftmaxWithLoss layer in TRAIN phase (its scores are the "
                     "student's)")


def with_teacher(net_param, blob_counts: dict[str, int], temperature: float, weight: float, source: str):
    """A copy of the (fine-tuning) net with the frozen teacher and the soft-target loss (module docstring).
    `blob_counts`: how many parameter blobs each layer of the plain net has (from its caffemodel), so that
    every one of the teacher's is frozen."""
    if not temperature > 0 or not weight > 0:
        raise ClipqError(f"distillation needs a temperature and a weight > 0, got {temperature} and {weight}")
    scores = scores_blob(net_param, source)
    pb2 = caffe_io.caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net_param)
    inputs = {top for layer in net_param.layer if layer.type in ("Data", "Input") for top in layer.top}
    renamed = {}  # student blob -> teacher blob
    for layer in net_param.layer:
        if layer.type in SKIPPED or not in_phase(layer, "TRAIN"):
            if layer.type == "Dropout" and in_phase(layer, "TRAIN"):  # the teacher sees what TEST would
                renamed[layer.top[0]] = renamed.get(layer.bottom[0], layer.bottom[0])
            continue
        teacher = out.layer.add()
        teacher.CopyFrom(layer)
        teacher.name = PREFIX + layer.name
        teacher.ClearField("include")
        teacher.include.add(phase=pb2.TRAIN)
        teacher.ClearField("exclude")
        teacher.ClearField("loss_weight")
        del teacher.bottom[:]
        teacher.bottom.extend(b if b in inputs else renamed.get(b, PREFIX + b) for b in layer.bottom)
        del teacher.top[:]
        teacher.top.extend(PREFIX + t for t in layer.top)
        renamed.update({t: PREFIX + t for t in layer.top})
        del teacher.param[:]
        for _ in range(blob_counts.get(layer.name, 0)):
            teacher.param.add(lr_mult=0, decay_mult=0)
        if layer.type == "BatchNorm":
            teacher.batch_norm_param.use_global_stats = True
    if scores not in renamed:
        raise ClipqError(f"{source}: the scores blob '{scores}' has no teacher copy (is it made by a data layer?)")
    loss = out.layer.add(name=LOSS_LAYER, type="Python", bottom=[scores, renamed[scores]], top=["distill_loss"],
                         loss_weight=[weight], propagate_down=[True, False])
    loss.include.add(phase=pb2.TRAIN)
    loss.python_param.module = "clipq_layers"
    loss.python_param.layer = "SoftTargetLoss"
    loss.python_param.param_str = f'{{"temperature": {float(temperature)}}}'
    return out


def teacher_layers(baseline: str) -> list[caffemodel.LayerWeights]:
    """The baseline caffemodel's layers with weights, renamed as the teacher's."""
    return [caffemodel.LayerWeights(PREFIX + w.name, w.type, w.blobs) for w in caffemodel.read(baseline) if w.blobs]


def is_teacher(layer_name: str) -> bool:
    return layer_name.startswith(PREFIX)
