#!/usr/bin/env python3
"""Per-iteration cost of CLIP-Q layers over plain Caffe layers, measured in the same run.

For each net, the same solver steps (forward + backward + SGD update, pycaffe `solver.step(1)`) on a
plain Caffe net and on its `clipq convert` version; prints median milliseconds and the ratio. Then the
pruning-quantization operator alone on an fc6-sized array against a copy and an np.partition of it.

    .venv/bin/python bench/layer_overhead.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clipq import caffe_io, convert, doctor, prune_quant
from clipq.plan import LayerPlan

ALEXNET_FC = {"fc6": LayerPlan(0.96, 3), "fc7": LayerPlan(0.95, 3)}  # the paper's Table 1
LENET5 = {"conv1": LayerPlan(0.2, 6), "conv2": LayerPlan(0.6, 4), "ip1": LayerPlan(0.9, 3), "ip2": LayerPlan(0.5, 4)}


def fc_block(batch: int) -> str:
    """AlexNet's fc6 (9216 -> 4096) and fc7 (4096 -> 4096) with ReLUs, on constant DummyData."""
    return f"""
name: "fc_block"
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: {batch} dim: 9216 }} shape {{ dim: {batch} }}
    data_filler {{ type: "constant" value: 0.01 }} data_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "data" top: "fc6"
  inner_product_param {{ num_output: 4096 weight_filler {{ type: "gaussian" std: 0.005 }} }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param {{ num_output: 4096 weight_filler {{ type: "gaussian" std: 0.005 }} }} }}
layer {{ name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc7" bottom: "label" top: "loss" }}
"""


def lenet5(batch: int) -> str:
    """Caffe's LeNet (prototxt/lenet5) on constant DummyData of Fashion-MNIST's shape."""
    from clipq import nets

    body = caffe_io.caffe_pb2().NetParameter()
    deploy = nets.deploy("LeNet5", nets.lenet5_body, nets.FASHION_MNIST_DATA)
    body.CopyFrom(deploy)
    del body.layer[0]  # Input
    del body.layer[-1]  # Softmax
    head = f"""
name: "lenet5"
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: {batch} dim: 1 dim: 28 dim: 28 }} shape {{ dim: {batch} }}
    data_filler {{ type: "constant" value: 0.5 }} data_filler {{ type: "constant" value: 3 }} }} }}
"""
    tail = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }\n'
    return head + "\n".join(f"layer {{\n{layer}}}" for layer in body.layer) + tail


def step_ms(net_text: str, repeats: int, workdir: Path) -> float:
    """Median wall time of solver.step(1) (forward + backward + update) after 2 warm-up steps."""
    cf = caffe_io.caffe()
    net_path, solver_path = workdir / "net.prototxt", workdir / "solver.prototxt"
    net_path.write_text(net_text)
    solver_path.write_text(f'net: "{net_path}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\n'
                           'lr_policy: "fixed"\nmax_iter: 100000\nsnapshot_after_train: false\nsolver_mode: CPU\n')
    solver = cf.SGDSolver(str(solver_path))
    solver.step(2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solver.step(1)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def clipq_version(net_text: str, plan: dict, workdir: Path) -> str:
    path = workdir / "plain.prototxt"
    path.write_text(net_text)
    return str(convert.to_clipq(caffe_io.read_net_param(path), plan))


def median_ms(fn, repeats: int) -> float:
    """Median wall time in ms after one untimed warm-up run (JIT compilation, page cache)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def machine_line() -> str:
    import multiprocessing

    import caffe
    import numba

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    stamp = doctor.read_build_stamp(Path(caffe.__file__).resolve().parents[2])
    return (f"# machine: {cpu}, {multiprocessing.cpu_count()} cores | caffe {stamp.get('source_kind', '?')} "
            f"{stamp.get('commit', '?')[:7]} CPU | numpy {np.__version__} | numba {numba.__version__} "
            f"({numba.get_num_threads()} threads)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per net (median reported)")
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"# median of {args.repeats} solver steps after 2 warm-up; goal = the issue's bound on the ratio")
    print(f"{'net':<28}{'caffe ms':>10}{'clipq ms':>10}{'ratio':>8}{'goal':>7}")
    cases = [("LeNet-5, batch 64", lenet5(64), LENET5, 2.0),
             ("fc6+fc7, batch 32", fc_block(32), ALEXNET_FC, 2.0),
             ("fc6+fc7, batch 256", fc_block(256), ALEXNET_FC, 1.3)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, text, plan, goal in cases:
            plain = step_ms(text, args.repeats, workdir)
            ours = step_ms(clipq_version(text, plan, workdir), args.repeats, workdir)
            print(f"{name:<28}{plain:>10.1f}{ours:>10.1f}{ours / plain:>7.2f}x{goal:>6.1f}x")

    w = np.random.default_rng(0).normal(0, 0.005, 4096 * 9216).astype(np.float32)
    out = np.empty_like(w)
    copy_ms = median_ms(lambda: np.copyto(out, w), args.repeats)
    partition_ms = median_ms(lambda: np.partition(w, w.size // 2), max(3, args.repeats // 3))
    op_ms = median_ms(lambda: prune_quant.clip_quantize(w, 0.96, 3, out=out), args.repeats)
    print("\n# operator alone on fc6's 37.7M weights (p 0.96, b 3)")
    print(f"{'copy (np.copyto)':<28}{copy_ms:>10.1f} ms")
    print(f"{'np.partition':<28}{partition_ms:>10.1f} ms {partition_ms / copy_ms:>6.1f}x copy")
    print(f"{'clip_quantize':<28}{op_ms:>10.1f} ms {op_ms / copy_ms:>6.1f}x copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
