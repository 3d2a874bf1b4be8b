#!/usr/bin/env python3
"""`.clipq` encode / decode time for an AlexNet-sized model, against Caffe saving / loading the
same net's caffemodel, measured in the same run.

The model: BVLC AlexNet's deploy (61M weights) with random Gaussian weights, compressed with the
paper's Table 1 (p, b). Caffe reference: pycaffe `net.save(caffemodel)` and `caffe.Net(deploy,
caffemodel)`. clipq: `clipq encode` (read the caffemodel, prune-quantize, pack, write .clipq) and
`clipq decode` (read .clipq, unpack, write the plain caffemodel), and `clipq encode` of an exported
model (weights already quantized: no operator, only the codec). Each clipq step is interleaved with its
Caffe reference (as in bench/layer_overhead.py): ratio = median of the per-repetition ratios, with their
min .. max.

    .venv/bin/python bench/codec.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_overhead import interleaved, machine_line, row  # noqa: E402

from clipq import plan
from clipq.caffe import caffe_io
from clipq.workflows import compressed_model

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "prototxt" / "alexnet" / "deploy.prototxt"
PLAN = REPO / "prototxt" / "alexnet" / "paper_params.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per row (>= 5)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (a median and a spread need them)")
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        net = cf.Net(str(DEPLOY), cf.TEST)
        rng = np.random.default_rng(0)
        for blobs in net.params.values():
            for blob in blobs:
                blob.data[...] = rng.normal(0, 0.01, blob.data.shape)
        weights, packed, decoded = tmp / "alexnet.caffemodel", tmp / "alexnet.clipq", tmp / "decoded.caffemodel"
        count = sum(b.data.size for blobs in net.params.values() for b in blobs)
        paper_plan = plan.load_plan(PLAN)

        def save():
            net.save(str(weights))

        save()
        pairs = [  # (row, Caffe's step, clipq's step); each clipq step reads what the rows before wrote
            ("encode vs save", save, lambda: compressed_model.encode_file(DEPLOY, weights, packed, paper_plan)),
            ("decode vs load", lambda: cf.Net(str(DEPLOY), str(weights), cf.TEST),
             lambda: compressed_model.decode_file(packed, decoded)),
            ("encode exported vs save", save,
             lambda: compressed_model.encode_file(DEPLOY, decoded, tmp / "re.clipq", paper_plan)),
        ]
        print(f"# AlexNet deploy, {count / 1e6:.1f}M parameters, random weights, paper Table 1 (p, b); "
              f"{args.repeats} repetitions, each step right after its Caffe reference (order alternating)")
        print(f"{'step':<26}{'caffe ms':>10}{'clipq ms':>10}{'ratio':>9}  {'spread':<12}{'goal':>7}")
        for name, reference, step in pairs:
            step()  # warm-up (JIT compilation, page cache)
            ref, cand = interleaved(reference, step, args.repeats, calls=1)
            print(row(name, ref, cand, 1.0), flush=True)
        print(f"# caffemodel {weights.stat().st_size / 1e6:.1f} MB, .clipq {packed.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
