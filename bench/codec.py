#!/usr/bin/env python3
"""`.clipq` encode / decode time for an AlexNet-sized model, against Caffe saving / loading the
same net's caffemodel, measured in the same run.

The model: BVLC AlexNet's deploy (61M weights) with random Gaussian weights, compressed with the
paper's Table 1 (p, b). Caffe reference: pycaffe `net.save(caffemodel)` and `caffe.Net(deploy,
caffemodel)`. clipq: `clipq encode` (read the caffemodel, prune-quantize, pack, write .clipq) and
`clipq decode` (read .clipq, unpack, write the plain caffemodel), and `clipq encode` of an exported
model (weights already quantized: no operator, only the codec).

    .venv/bin/python bench/codec.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_overhead import machine_line, median_ms  # noqa: E402

from clipq import caffe_io, compressed_model, plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "prototxt" / "alexnet" / "deploy.prototxt"
PLAN = REPO / "prototxt" / "alexnet" / "paper_params.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each step after a warm-up (median reported)")
    args = parser.parse_args(argv)
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
        steps = {
            "caffe save (net.save)": lambda: net.save(str(weights)),
            "caffe load (caffe.Net)": lambda: cf.Net(str(DEPLOY), str(weights), cf.TEST),
            "clipq encode": lambda: compressed_model.encode_file(DEPLOY, weights, packed, paper_plan),
            "clipq decode": lambda: compressed_model.decode_file(packed, decoded),
            "clipq encode (exported)": lambda: compressed_model.encode_file(DEPLOY, decoded, tmp / "re.clipq",
                                                                            paper_plan),
        }
        times = {name: median_ms(step, args.repeats) / 1000 for name, step in steps.items()}
        print(f"# AlexNet deploy, {count / 1e6:.1f}M parameters, random weights, paper Table 1 (p, b); "
              f"median of {args.repeats}")
        print(f"# caffemodel {weights.stat().st_size / 1e6:.1f} MB, .clipq {packed.stat().st_size / 1e6:.2f} MB")
        print(f"{'step':<26}{'seconds':>9}{'vs caffe':>10}")
        for name, seconds in times.items():
            reference = times["caffe save (net.save)"] if "encode" in name or "save" in name \
                else times["caffe load (caffe.Net)"]
            print(f"{name:<26}{seconds:>9.2f}{seconds / reference:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
