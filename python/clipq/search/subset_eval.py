"""The search's measurement of a candidate (p, b) for one layer (CLIP-Q section 3.2, Eq. 1-2).

eps(theta): the search metric of the network on a random subset of the data with only that layer
pruned-quantized (no fine-tuning), run by real Caffe in TEST phase:
- `error`: top-1 error in percent (the paper's);
- `loss`: 100 x the net's mean loss (its SoftmaxWithLoss);
- `kl`: 100 x the mean KL divergence, in nats, of the net's class distribution from the uncompressed net's
  on the same images (computed once); it needs no labels and moves before top-1 does (on a subset the
  baseline gets right, most (p, b) change no top-1 decision but all of them move the distribution).
The factor 100 keeps every metric on the scale of the error in percent, so lambda means about the same.
c_i(theta) = (m_i - s_i(theta)) / sum_j m_j: m are float32 bits (weights + bias), s_i the layer's real
size in the `.clipq` format (`sparse_codec`), the sum over all learnable layers of the net.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io
from clipq.caffe.preflight import in_phase
from clipq.quant import prune_quant
from clipq.storage import sparse_codec
from clipq.util.errors import ClipqError

EVAL_BATCH = 100
METRICS = ("error", "loss", "kl")


@dataclass(frozen=True)
class OutputBlobs:
    """The blobs of the search net each metric reads."""

    accuracy: str               # top-1 Accuracy's top
    scores: str                 # its first bottom: the class scores
    loss: str | None            # SoftmaxWithLoss's top, if the net has one in TEST phase
    probabilities: bool = False  # the scores are a Softmax's output (else logits)


def training_source(net_param, source: str) -> str:
    """The LMDB of the net's TRAIN-phase Data layer."""
    train = caffe_io.caffe_pb2().Phase.Value("TRAIN")
    for layer in net_param.layer:
        if layer.type == "Data" and any(rule.phase == train for rule in layer.include):
            return layer.data_param.source
    raise ClipqError(f"{source}: no TRAIN-phase LMDB Data layer to draw the search's subset from; add one, "
                     "or search on held-out images (`clipq search --data LMDB`, `--val LMDB` in compress / zoo)")


def write_subset(train_lmdb: str, count: int, seed: int, out: Path) -> None:
    """A random subset of `count` entries of an LMDB (same Datums, in the LMDB's order), written atomically."""
    def chosen(entries: int) -> np.ndarray:
        if entries < count:
            raise ClipqError(f"{train_lmdb}: {entries} entries, fewer than the subset's {count}")
        return np.sort(np.random.default_rng(seed).choice(entries, count, replace=False))

    caffe_io.copy_lmdb(train_lmdb, out, chosen, "training LMDB")


def usable_count(entries: int) -> int:
    """How many of an LMDB's `entries` the evaluator can score: all of them up to one eval batch, else the
    largest multiple of EVAL_BATCH."""
    return entries if entries <= EVAL_BATCH else entries - entries % EVAL_BATCH


def eval_batch(count: int) -> int:
    """Batch size of the subset net: EVAL_BATCH, or the whole subset if smaller."""
    return min(EVAL_BATCH, count)


def eval_net_param(net_param, subset: Path, count: int, source: str) -> tuple[object, OutputBlobs]:
    """The train_val with its TEST Data layer reading the subset, and the blobs the metrics read."""
    pb2 = caffe_io.caffe_pb2()
    test = pb2.Phase.Value("TEST")
    net = pb2.NetParameter()
    net.CopyFrom(net_param)
    data = [layer for layer in net.layer if layer.type == "Data" and any(r.phase == test for r in layer.include)]
    accuracy = [layer for layer in net.layer if layer.type == "Accuracy" and layer.accuracy_param.top_k == 1]
    if len(data) != 1 or not accuracy:
        raise ClipqError(f"{source}: the search needs one TEST-phase Data layer and a top-1 Accuracy layer")
    data[0].data_param.source = str(subset)
    data[0].data_param.batch_size = eval_batch(count)
    scores = accuracy[0].bottom[0]
    makers = [layer for layer in net.layer if scores in layer.top and in_phase(layer, "TEST")]
    losses = [layer for layer in net.layer if layer.type == "SoftmaxWithLoss" and in_phase(layer, "TEST")]
    return net, OutputBlobs(accuracy[0].top[0], scores, losses[0].top[0] if losses else None,
                            bool(makers) and makers[-1].type == "Softmax")


class SubsetEvaluator:
    """The metric and compression benefit of candidate (p, b) for single layers, on the subset, in Caffe."""

    def __init__(self, eval_prototxt: str | os.PathLike, weights: str | os.PathLike, blobs: OutputBlobs,
                 count: int, metric: str = "error"):
        if metric not in METRICS:
            raise ClipqError(f"--search-metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "loss" and blobs.loss is None:
            raise ClipqError(f"{eval_prototxt}: --search-metric loss needs a SoftmaxWithLoss layer in TEST phase")
        cf = caffe_io.caffe()
        caffe_io.set_mode()
        self.net = cf.Net(str(eval_prototxt), str(weights), cf.TEST)
        self.blobs, self.metric = blobs, metric
        self.iterations = count // eval_batch(count)
        self.original = {name: [b.data.copy() for b in blobs] for name, blobs in self.net.params.items()}
        self.total_bits = 32 * sum(b.size for blobs in self.original.values() for b in blobs)
        self.reference = self.reference_distributions() if metric == "kl" else None

    def reference_distributions(self) -> list[np.ndarray]:
        """The uncompressed net's log class probabilities, batch by batch (the Data layer reads the subset in
        the same order every pass)."""
        reference = []
        for _ in range(self.iterations):
            self.net.forward()
            reference.append(self.log_probabilities())
        return reference

    def log_probabilities(self) -> np.ndarray:
        """log softmax of the last forward's class scores, one row per image."""
        scores = self.net.blobs[self.blobs.scores].data
        scores = scores.reshape(scores.shape[0], -1).astype(np.float64)
        if self.blobs.probabilities:
            return np.log(np.maximum(scores, 1e-30))
        shifted = scores - scores.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def batch_value(self, batch: int) -> float:
        """The metric of one forward pass (batch `batch` of the subset), before the factor 100."""
        self.net.forward()
        if self.metric == "error":
            return 1.0 - float(self.net.blobs[self.blobs.accuracy].data)
        if self.metric == "loss":
            return float(self.net.blobs[self.blobs.loss].data)
        reference = self.reference[batch]
        return float(np.mean(np.sum(np.exp(reference) * (reference - self.log_probabilities()), axis=1)))

    def measure(self) -> float:
        """100 x the metric over the subset (every batch once, in order)."""
        return 100.0 * sum(self.batch_value(b) for b in range(self.iterations)) / self.iterations

    def benefit(self, layer: str, q: prune_quant.Quantized) -> float:
        """c_i: the layer's saved bits (float32 -> sparse encoding) over all of the net's float32 bits."""
        blobs = self.original[layer]
        encoded = sparse_codec.Layer(layer, "?", [q.weights] + blobs[1:], q.codes, q.codebook,
                                     int(np.log2(q.codebook.size + 1)))
        _, payload = sparse_codec.encode_layer(encoded)
        original_bits = 32 * sum(b.size for b in blobs)
        return (original_bits - 8 * len(payload)) / self.total_bits

    def with_weights(self, replaced: dict[str, np.ndarray]) -> float:
        """The metric with these layers' weights replaced (no fine-tuning); the weights are restored."""
        try:
            for name, w in replaced.items():
                self.net.params[name][0].data[...] = w
            return self.measure()
        finally:
            for name in replaced:
                self.net.params[name][0].data[...] = self.original[name][0]

    def __call__(self, layer: str, p: float, bits: int) -> tuple[float, float]:
        """(the metric, c_i) of the net with `layer` pruned-quantized at (p, bits); the layer is restored."""
        weights = self.net.params[layer][0].data
        q = prune_quant.clip_quantize(self.original[layer][0], p, bits, out=weights)
        try:
            return self.measure(), self.benefit(layer, q)
        finally:
            weights[...] = self.original[layer][0]
