#!/usr/bin/env python3
"""OpenCV's test top-1 of a `clipq compress` output: its decoded caffemodel read by OpenCV's DNN through the
Caffe files and through the dense ONNX (OpenCV 4 cannot read the codes + codebook ONNX; docs/onnx.md), on
the images of the run's TEST Data layer, against Caffe's top-1 in the run's report.

usage: tools/opencv_top1.py OUT      (OUT: a finished `clipq compress --out OUT`, e.g. cache/results/lenet5_seed0)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from clipq.caffe import caffe_io, deploy_net
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model


def top1(net, deploy: deploy_net.Deploy, output: str | None) -> tuple[float, int]:
    right = total = 0
    for images, labels in deploy_net.batches(deploy.data, "test"):
        net.setInput(images.astype(np.float32))
        scores = net.forward(output) if output else net.forward()
        right += int((scores.reshape(len(labels), -1).argmax(1) == labels).sum())
        total += len(labels)
    return right / total, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished `clipq compress` output directory")
    args = parser.parse_args(argv)
    try:
        train_val = args.out / "plain_train_val.prototxt"
        candidates = (args.out / "final_decoded.caffemodel", args.out / "decoded.caffemodel")
        decoded = next(path for path in candidates if path.exists())
        deploy = deploy_net.from_train_val(caffe_io.read_net_param(train_val), str(train_val))
        report = json.loads((args.out / "report.json").read_text())
    except (ClipqError, OSError, StopIteration) as e:
        print(f"opencv_top1: {args.out}: not a finished `clipq compress` output ({str(e) or 'no decoded caffemodel'})",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        prototxt, dense = Path(tmp) / "deploy.prototxt", Path(tmp) / "dense.onnx"
        deploy_net.write(deploy, prototxt, f"the deploy of {train_val}")
        compressed_model.export_onnx(prototxt, dense, weights=decoded)
        for name, net, output in (("Caffe files", cv2.dnn.readNetFromCaffe(str(prototxt), str(decoded)), deploy.scores),
                                  ("dense ONNX", cv2.dnn.readNetFromONNX(str(dense)), None)):
            accuracy, images = top1(net, deploy, output)
            print(f"OpenCV {cv2.__version__}, {name}: top-1 {accuracy:.4f} on {images:,} images")
    print(f"Caffe (the run's report): top-1 {report['accuracy']['decoded']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
