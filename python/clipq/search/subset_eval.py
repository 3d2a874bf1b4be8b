"""The search's measurement of a candidate (p, b) for one layer (CLIP-Q section 3.2, Eq. 1-2).

eps(theta): top-1 error, in percent, of the network on a random subset of the training data with only
that layer pruned-quantized (no fine-tuning), run by real Caffe in TEST phase.
c_i(theta) = (m_i - s_i(theta)) / sum_j m_j: m are float32 bits (weights + bias), s_i the layer's real
size in the `.clipq` format (`sparse_codec`), the sum over all learnable layers of the net.
"""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np

from clipq.caffe import caffe_io
from clipq.quant import prune_quant
from clipq.storage import sparse_codec
from clipq.util.atomic import atomic_dir
from clipq.util.errors import ClipqError

EVAL_BATCH = 100


def training_source(net_param, source: str) -> str:
    """The LMDB of the net's TRAIN-phase Data layer."""
    train = caffe_io.caffe_pb2().Phase.Value("TRAIN")
    for layer in net_param.layer:
        if layer.type == "Data" and any(rule.phase == train for rule in layer.include):
            return layer.data_param.source
    raise ClipqError(f"{source}: no TRAIN-phase LMDB Data layer to draw the search's subset from; add one, "
                     "or search on held-out images (`clipq search --data LMDB`, `--val LMDB` in compress / zoo)")


def write_subset(train_lmdb: str, count: int, seed: int, out: Path) -> None:
    """A random subset of `count` entries of an LMDB (same Datums), written atomically."""
    try:
        env = lmdb.open(str(train_lmdb), readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{train_lmdb}: cannot open the training LMDB ({e})") from None
    with env.begin() as txn:
        keys = [key for key, _ in txn.cursor()]
        if len(keys) < count:
            raise ClipqError(f"{train_lmdb}: {len(keys)} entries, fewer than the subset's {count}")
        chosen = sorted(np.random.default_rng(seed).choice(len(keys), count, replace=False))
        with atomic_dir(out) as tmp:
            subset = lmdb.open(str(tmp), map_size=1 << 40, subdir=True)
            with subset.begin(write=True) as wtxn:
                for i, index in enumerate(chosen):
                    wtxn.put(b"%08d" % i, txn.get(keys[index]))
            subset.close()
    env.close()


def eval_batch(count: int) -> int:
    """Batch size of the subset net: EVAL_BATCH, or the whole subset if smaller."""
    return min(EVAL_BATCH, count)


def eval_net_param(net_param, subset: Path, count: int, source: str):
    """The train_val with its TEST Data layer reading the subset, and the top-1 accuracy blob's name."""
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
    return net, accuracy[0].top[0]


class SubsetEvaluator:
    """Error and compression benefit of candidate (p, b) for single layers, on the subset, in Caffe."""

    def __init__(self, eval_prototxt: str | os.PathLike, weights: str | os.PathLike, accuracy_blob: str,
                 count: int):
        cf = caffe_io.caffe()
        caffe_io.set_mode()
        self.net = cf.Net(str(eval_prototxt), str(weights), cf.TEST)
        self.accuracy_blob = accuracy_blob
        self.iterations = count // eval_batch(count)
        self.original = {name: [b.data.copy() for b in blobs] for name, blobs in self.net.params.items()}
        self.total_bits = 32 * sum(b.size for blobs in self.original.values() for b in blobs)

    def error(self) -> float:
        """Top-1 error in percent over the subset (every batch once)."""
        correct = 0.0
        for _ in range(self.iterations):
            self.net.forward()
            correct += float(self.net.blobs[self.accuracy_blob].data)
        return 100.0 * (1.0 - correct / self.iterations)

    def benefit(self, layer: str, q: prune_quant.Quantized) -> float:
        """c_i: the layer's saved bits (float32 -> sparse encoding) over all of the net's float32 bits."""
        blobs = self.original[layer]
        encoded = sparse_codec.Layer(layer, "?", [q.weights] + blobs[1:], q.codes, q.codebook,
                                     int(np.log2(q.codebook.size + 1)))
        _, payload = sparse_codec.encode_layer(encoded)
        original_bits = 32 * sum(b.size for b in blobs)
        return (original_bits - 8 * len(payload)) / self.total_bits

    def __call__(self, layer: str, p: float, bits: int) -> tuple[float, float]:
        """(error %, c_i) of the net with `layer` pruned-quantized at (p, bits); the layer is restored."""
        weights = self.net.params[layer][0].data
        q = prune_quant.clip_quantize(self.original[layer][0], p, bits, out=weights)
        try:
            return self.error(), self.benefit(layer, q)
        finally:
            weights[...] = self.original[layer][0]
