#!/usr/bin/env python3
"""Per-iteration cost of CLIP-Q layers over plain Caffe layers, measured in the same run.

For each net, solver steps (forward + backward + SGD update, pycaffe `solver.step(1)`) on a plain Caffe
net and on its `clipq convert` version, interleaved: each repetition times a few steps of one right after
the other, so a load that comes and goes on the machine hits both. Prints the medians, the median of the
per-repetition ratios and their spread, and the goal of issue 15. Then the pruning-quantization operator
alone (called as the layer calls it) on an fc6-sized array, interleaved with a copy of it.

    .venv/bin/python bench/layer_overhead.py [--repeats 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clipq.caffe import build, caffe_io, convert, nets
from clipq.plan import LayerPlan
from clipq.quant import prune_quant

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


def make_solver(net_text: str, workdir: Path, tag: str):
    """A pycaffe SGD solver on net_text (CPU), warmed up by 2 steps."""
    cf = caffe_io.caffe()
    net_path, solver_path = workdir / f"{tag}_net.prototxt", workdir / f"{tag}_solver.prototxt"
    net_path.write_text(net_text)
    solver_path.write_text(f'net: "{net_path}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\n'
                           'lr_policy: "fixed"\nmax_iter: 100000000\nsnapshot_after_train: false\nsolver_mode: CPU\n')
    solver = cf.SGDSolver(str(solver_path))
    solver.step(2)
    return solver


def seconds(fn, calls: int) -> float:
    """Wall time per call of `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved(reference, candidate, repeats: int, calls: int) -> tuple[list[float], list[float]]:
    """Per repetition, the reference's and the candidate's time per call, measured one right after the
    other (so both see the same machine load); the order alternates between repetitions."""
    ref, cand = [], []
    for rep in range(repeats):
        if rep % 2:
            cand.append(seconds(candidate, calls))
            ref.append(seconds(reference, calls))
        else:
            ref.append(seconds(reference, calls))
            cand.append(seconds(candidate, calls))
    return ref, cand


def solver_steps(net_text: str, plan: dict, workdir: Path, repeats: int, steps: int):
    """Interleaved step times of the plain net and of its CLIP-Q version (both solvers freed on return)."""
    plain = make_solver(net_text, workdir, "plain")
    ours = make_solver(clipq_version(net_text, plan, workdir), workdir, "clipq")
    return interleaved(lambda: plain.step(1), lambda: ours.step(1), repeats, steps)


def row(name: str, ref: list[float], cand: list[float], goal: float, unit_ms: bool = True) -> str:
    """Medians, the median per-repetition ratio, its spread (min .. max) and the goal."""
    ratios = sorted(c / r for r, c in zip(ref, cand))
    return (f"{name:<26}{1000 * statistics.median(ref):>10.1f}{1000 * statistics.median(cand):>10.1f}"
            f"{statistics.median(ratios):>8.2f}x  {ratios[0]:.2f} .. {ratios[-1]:.2f}{goal:>8.2f}x"
            f"{'  met' if statistics.median(ratios) <= goal else '  NOT met':>9}")


def clipq_version(net_text: str, plan: dict, workdir: Path) -> str:
    path = workdir / "plain.prototxt"
    path.write_text(net_text)
    return str(convert.to_clipq(caffe_io.read_net_param(path), plan))


def machine_line() -> str:
    import multiprocessing

    import numba

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    stamp = build.read_build_stamp()
    return (f"# machine: {cpu}, {multiprocessing.cpu_count()} cores | caffe {stamp.get('source_kind', '?')} "
            f"{stamp.get('commit', '?')[:7]} CPU | numpy {np.__version__} | numba {numba.__version__} "
            f"({numba.get_num_threads()} threads)")


def thread_line() -> str:
    import numba

    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
                    if k in os.environ) or "no thread variables set"
    return (f"# threads: numba {numba.get_num_threads()} (the operator), Caffe's BLAS as built ({env}); "
            f"load average at start {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions per row (>= 5)")
    parser.add_argument("--steps", type=int, default=5, help="solver steps (or operator calls) per repetition")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (a median and a spread need them)")
    print(machine_line())
    print(thread_line())
    print(f"# {args.repeats} repetitions of {args.steps} solver steps (forward + backward + update) per net, "
          "plain Caffe and CLIP-Q interleaved; ratio = median of the per-repetition ratios, spread = their "
          "min .. max")
    print(f"{'net':<26}{'caffe ms':>10}{'clipq ms':>10}{'ratio':>9}  {'spread':<12}{'goal':>7}")
    cases = [("LeNet-5, batch 64", lenet5(64), LENET5, 1.5),
             ("fc6+fc7, batch 32", fc_block(32), ALEXNET_FC, 1.6),
             ("fc6+fc7, batch 256", fc_block(256), ALEXNET_FC, 1.25)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, text, plan, goal in cases:
            ref, cand = solver_steps(text, plan, workdir, args.repeats, args.steps)
            print(row(name, ref, cand, goal), flush=True)

    w = np.random.default_rng(0).normal(0, 0.005, 4096 * 9216).astype(np.float32)
    out = np.empty_like(w)
    last = [prune_quant.clip_quantize(w, 0.96, 3, out=out)]

    def operator():  # as the layer calls it: the previous result brackets the selection
        last[0] = prune_quant.clip_quantize(w, 0.96, 3, out=out, previous=last[0])

    print(f"\n# operator alone on fc6's 37.7M weights (p 0.96, b 3), {args.repeats} x {args.steps} calls "
          "interleaved with as many copies")
    print(f"{'':<26}{'copy ms':>10}{'op ms':>10}{'ratio':>9}  {'spread':<12}{'goal':>7}")
    ref, cand = interleaved(lambda: np.copyto(out, w), operator, args.repeats, args.steps)
    print(row("clip_quantize vs np.copyto", ref, cand, 4.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
