#!/usr/bin/env python3
"""Running a compressed model: file sizes, load time, memory and latency per runtime, against Caffe.

For LeNet-5 (the trained Fashion-MNIST model with prototxt/lenet5/example_plan.yaml, or random weights if
`make baseline` has not run) and AlexNet's deploy (random Gaussian weights, the paper's Table 1 (p, b)), one
run makes the `.clipq` file (`clipq encode`), its decoded caffemodel (`clipq decode`), the ONNX models
(`clipq export-onnx`: uint8 codes at opset 13, UINT4 codes at opset 21, dense from the decoded caffemodel)
and the ncnn model (`clipq export-ncnn`: 256-entry tables), then prints

  - file bytes, each against the dense caffemodel;
  - whether onnxruntime keeps the weights compressed: the graph it optimizes (`optimized_model_filepath`)
    with default folding and with `optimization.constant_folding_max_output_size_in_bytes` = 1;
  - per runtime: load time (construction + the first batch-1 run), resident memory (VmRSS) before load,
    after load and after the timed runs, and latency per batch of 1 and of 64, each against pycaffe on the
    decoded caffemodel (1.00x), plus how far its batch-1 output is from pycaffe's.

Runtimes: pycaffe and OpenCV's DNN on the decoded caffemodel; onnxruntime on the dense ONNX, on the uint8
ONNX with default folding ("folded": Cast + Gather become dense weights at load) and with folding capped
("kept": decoded on every run; the uint8 and the UINT4 model, and the uint8 one with onnxruntime's CPU
memory arena off, so the decoded weights are freed after each run); OpenCV on the dense ONNX (OpenCV 4
cannot read the codes + codebook ONNX); ncnn on the `.bin` with tables (decoded to float32 at load), in
plain float32 as the tests run it (fp16 / bf16, packing, winograd and sgemm off) on all cores. The others
use their default threads.

Each runtime runs in its own child process (this script's `--worker` mode), so a process's RSS is its
runtime's; one repetition starts every runtime once, in an order that is reversed every other repetition,
so a load that comes and goes on the machine hits all of them. Reported: median of the repetitions and
their min .. max; a ratio is the median of the per-repetition ratios to pycaffe. ncnn runs one sample per
call: its batch 64 is 64 sequential calls.

    .venv/bin/python bench/deploy.py [--repeats 5] [--nets lenet5,alexnet] [--markdown]
    .venv/bin/python bench/deploy.py --quick          # LeNet-5 only, 2 repetitions (tests)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEEP_COMPRESSED = "optimization.constant_folding_max_output_size_in_bytes"
FP32 = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed",
        "use_packing_layout", "use_winograd_convolution", "use_sgemm_convolution", "use_int8_inference")
BATCHES = (1, 64)
MIN_SECONDS = 0.3  # timed calls per batch and process: at least one, and until this much time has passed
QUICK_SECONDS = 0.05


@dataclass(frozen=True)
class Runtime:
    key: str          # worker kind
    label: str        # table row
    file: str         # which of the net's files it reads


RUNTIMES = [
    Runtime("caffe", "pycaffe, decoded caffemodel", "caffemodel"),
    Runtime("ort", "onnxruntime, dense ONNX", "dense_onnx"),
    Runtime("ort", "onnxruntime, uint8, folded", "uint8_onnx"),
    Runtime("ort_kept", "onnxruntime, uint8, kept", "uint8_onnx"),
    Runtime("ort_kept", "onnxruntime, UINT4, kept", "uint4_onnx"),
    Runtime("ort_kept_no_arena", "onnxruntime, uint8, kept, no arena", "uint8_onnx"),
    Runtime("cv2_onnx", "OpenCV, dense ONNX", "dense_onnx"),
    Runtime("cv2_caffe", "OpenCV, decoded caffemodel", "caffemodel"),
    Runtime("ncnn", "ncnn, 256-entry tables", "ncnn"),
]
SIZE_ROWS = [("caffemodel", "dense float32 caffemodel (reference)"), ("dense_onnx", "dense float32 ONNX"),
             ("uint8_onnx", "ONNX, uint8 codes (opset 13)"), ("uint4_onnx", "ONNX, UINT4 codes (opset 21)"),
             ("ncnn", "ncnn .bin with tables (+ .param)"), ("clipq", ".clipq")]


# ---------------------------------------------------------------- worker: one runtime in its own process
def status_mb(field: str = "VmRSS") -> float:
    """This process's VmRSS (resident now) or VmHWM (its peak) in MB. Not ru_maxrss: Linux carries the
    parent's peak across fork + exec into the child's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load(kind: str, files: dict, threads: int):
    """A function running one batch (N, C, H, W) -> the net's output, for the runtime `kind`."""
    if kind == "caffe":
        import caffe

        caffe.set_mode_cpu()
        net = caffe.Net(files["deploy"], files["caffemodel"], caffe.TEST)
        data, out = net.inputs[0], net.outputs[-1]

        def run(x):
            if net.blobs[data].data.shape != x.shape:
                net.blobs[data].reshape(*x.shape)
                net.reshape()
            net.blobs[data].data[...] = x
            return net.forward()[out]
        return run
    if kind.startswith("ort"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # not a warning per Cast it does not fold
        if kind.startswith("ort_kept"):
            options.add_session_config_entry(KEEP_COMPRESSED, "1")
        if kind.endswith("no_arena"):  # decoded weights go back to the system after each run
            options.enable_cpu_mem_arena = False
        session = ort.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[-1]
    if kind in ("cv2_onnx", "cv2_caffe"):
        import cv2

        net = (cv2.dnn.readNetFromONNX(files["onnx"]) if kind == "cv2_onnx"
               else cv2.dnn.readNetFromCaffe(files["deploy"], files["caffemodel"]))

        def run(x):
            net.setInput(x)
            return net.forward()
        return run
    if kind == "ncnn":
        import ncnn

        net = ncnn.Net()
        for option in FP32:
            setattr(net.opt, option, False)
        net.opt.num_threads = threads
        assert net.load_param(files["param"]) == 0 and net.load_model(files["bin"]) == 0

        def run(x):  # one sample per call
            outs = []
            for sample in x:
                extractor = net.create_extractor()
                extractor.input("data", ncnn.Mat(np.ascontiguousarray(sample)).clone())
                status, mat = extractor.extract("prob")
                assert status == 0
                outs.append(np.array(mat).reshape(-1))
            return np.stack(outs)
        return run
    raise SystemExit(f"unknown runtime {kind}")


def worker(kind: str, files: dict, shape: list[int], threads: int, min_seconds: float) -> dict:
    """Load the runtime (construction), run batch 1 once (the input every runtime gets: its output is
    compared with pycaffe's), then time batches 1 and 64 (one warm-up call each); memory in MB."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal([b] + shape).astype(np.float32) for b in BATCHES}
    before = status_mb()
    start = time.perf_counter()
    run = _load(kind, files, threads)
    load_s = time.perf_counter() - start
    built = status_mb()
    start = time.perf_counter()
    output = np.array(run(inputs[1]), dtype=np.float64).reshape(-1)  # a copy: pycaffe returns its blob
    first_s = time.perf_counter() - start
    first = status_mb()
    seconds = {}
    for b in BATCHES:
        run(inputs[b])  # warm-up at this shape
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            run(inputs[b])
            calls += 1
        seconds[b] = (time.perf_counter() - start) / calls
    return {"load_s": load_s, "first_s": first_s, "rss_before": before, "rss_built": built, "rss_first": first,
            "rss_after": status_mb(), "peak": status_mb("VmHWM"),
            "seconds": {str(b): s for b, s in seconds.items()}, "output": output.tolist()}


# ---------------------------------------------------------------- parent: files, checks, repetitions
@dataclass
class Net:
    name: str
    deploy: Path
    plan: Path
    weights: Path | None        # a trained caffemodel, or None for random weights
    files: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    shape: list = field(default_factory=list)


def nets(names: list[str]) -> list[Net]:
    from clipq.util import paths

    trained = paths.models_dir() / "lenet5_fashion_mnist_55k.caffemodel"
    known = {"lenet5": Net("LeNet-5", REPO / "prototxt/lenet5/deploy.prototxt",
                           REPO / "prototxt/lenet5/example_plan.yaml", trained if trained.exists() else None),
             "alexnet": Net("AlexNet", REPO / "prototxt/alexnet/deploy.prototxt",
                            REPO / "prototxt/alexnet/paper_params.yaml", None)}
    return [known[n] for n in names]


def batch_one_deploy(deploy: Path, out: Path) -> list[int]:
    """The deploy with its input at batch 1 (so no runtime allocates the deploy's batch at load); returns
    the shape of one sample."""
    from google.protobuf import text_format

    from clipq.caffe import caffe_io

    net = caffe_io.read_net_param(deploy)
    dims = net.layer[0].input_param.shape[0].dim
    dims[0] = 1
    out.write_text(text_format.MessageToString(net))
    return list(dims[1:])


def symbolic_batch(path: Path, out: Path) -> None:
    """The ONNX model with its input and output batch axis named 'N' (one session runs batches 1 and 64;
    the converter's InnerProduct / Flatten copy the leading axes)."""
    import onnx  # lazy, as in clipq: only the parent builds files

    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(out))


def build_files(net: Net, tmp: Path) -> None:
    """`clipq encode`, `decode`, `export-onnx` (x3) and `export-ncnn` of the net, as the commands do them."""
    from clipq.plan import load_plan
    from clipq.workflows import compressed_model as cm

    d = tmp / net.name
    d.mkdir()
    deploy = d / "deploy.prototxt"
    net.shape = batch_one_deploy(net.deploy, deploy)
    clipq = d / "model.clipq"
    if net.weights:
        cm.encode_file(deploy, net.weights, clipq, load_plan(net.plan))
    else:  # random Gaussian weights (std 0.01, biases 0), as `clipq size` makes them
        data, _ = cm.encode_model(deploy, None, load_plan(net.plan))
        clipq.write_bytes(data)
    caffemodel = d / "decoded.caffemodel"
    cm.decode_file(clipq, caffemodel, deploy)
    onnx_files = {"uint8_onnx": cm.export_onnx(deploy, d / "uint8.onnx", clipq=clipq, opset=13).path,
                  "uint4_onnx": cm.export_onnx(deploy, d / "uint4.onnx", clipq=clipq, opset=21).path,
                  "dense_onnx": cm.export_onnx(deploy, d / "dense.onnx", weights=caffemodel).path}
    ncnn = cm.export_ncnn(deploy, d / "ncnn", clipq=clipq)
    net.sizes = {"clipq": clipq.stat().st_size, "caffemodel": caffemodel.stat().st_size,
                 "ncnn": ncnn.bin_bytes + ncnn.param_bytes,
                 **{k: p.stat().st_size for k, p in onnx_files.items()}}
    net.files = {"deploy": str(deploy), "caffemodel": str(caffemodel), "param": str(ncnn.param),
                 "bin": str(ncnn.bin)}
    for key, path in onnx_files.items():
        symbolic_batch(path, d / f"run_{path.name}")
        net.files[key] = str(d / f"run_{path.name}")


def folding_check(path: str, compressed: int, tmp: Path) -> str:
    """What onnxruntime's optimized graph (`optimized_model_filepath`) holds, with default folding and with
    folding capped at 1 byte: the Cast / Gather nodes left and the bytes of float32 initializers; says
    whether the cap really keeps one Cast + Gather per compressed layer."""
    import onnx
    import onnxruntime as ort

    parts, counts = [], {}
    for kept in (False, True):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warnings of each skipped folding, nor of the NCHWc layout
        if kept:
            options.add_session_config_entry(KEEP_COMPRESSED, "1")
        out = tmp / f"optimized_{kept}.onnx"
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(out))
        ops = [n.op_type for n in model.graph.node]
        floats = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT)
        counts[kept] = (ops.count("Cast"), ops.count("Gather"))
        parts.append(f"{'capped at 1 byte' if kept else 'default'}: {ops.count('Cast')} Cast + "
                     f"{ops.count('Gather')} Gather, {4 * floats:,} bytes of float32 initializers")
        out.unlink()
    verdict = ("the cap keeps every compressed layer's Cast + Gather" if counts[True] == (compressed, compressed)
               else f"NOT KEPT: the cap leaves {counts[True]} Cast / Gather for {compressed} compressed layers")
    return "; ".join(parts) + f" -> {verdict}"


def run_worker(runtime: Runtime, net: Net, threads: int, min_seconds: float) -> dict:
    files = dict(net.files)
    files["onnx"] = files.get(runtime.file, "")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", runtime.key, "--files", json.dumps(files),
               "--shape", json.dumps(net.shape), "--threads", str(threads), "--min-seconds", str(min_seconds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{runtime.label} on {net.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def repetitions(net: Net, repeats: int, threads: int, min_seconds: float) -> list[list[dict]]:
    """results[rep][runtime]: every runtime started once per repetition, the order reversed every other one."""
    results = []
    for rep in range(repeats):
        row: list = [None] * len(RUNTIMES)
        for i in list(range(len(RUNTIMES)))[::(-1 if rep % 2 else 1)]:
            row[i] = run_worker(RUNTIMES[i], net, threads, min_seconds)
        results.append(row)
        print(f"#   {net.name}: repetition {rep + 1} of {repeats} done", file=sys.stderr, flush=True)
    return results


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.2g}" if seconds < 0.01 else f"{1000 * seconds:.3g}" if seconds < 1 \
        else f"{1000 * seconds:.0f}"


def ms_spread(seconds: list[float]) -> str:
    values = sorted(seconds)
    return f"{ms(statistics.median(values))} [{ms(values[0])}..{ms(values[-1])}]"


def ratio_spread(ratios: list[float]) -> str:
    values = sorted(ratios)
    return f"{statistics.median(values):.2f}x [{values[0]:.2f}..{values[-1]:.2f}]"


def summarize(results: list[list[dict]]) -> list[dict]:
    """Per runtime: load, memory (medians), latency, per-repetition ratios to pycaffe (runtime 0), and the
    largest difference of its batch-1 output from pycaffe's, relative to the output's largest magnitude."""
    rows = []
    reference = np.asarray(results[0][0]["output"])
    for i, runtime in enumerate(RUNTIMES):
        mine = [rep[i] for rep in results]
        row = {"label": runtime.label, "load": [m["load_s"] for m in mine], "first": [m["first_s"] for m in mine]}
        for key in ("rss_before", "rss_built", "rss_first", "rss_after", "peak"):
            row[key] = statistics.median(m[key] for m in mine)
        outputs = [np.asarray(m["output"]) for m in mine]
        row["diff"] = max(float(np.abs(out - reference).max()) if out.size == reference.size else float("inf")
                          for out in outputs) / max(float(np.abs(reference).max()), 1e-30)
        for b in BATCHES:
            row[b] = [m["seconds"][str(b)] for m in mine]
            row[f"ratio{b}"] = [m["seconds"][str(b)] / rep[0]["seconds"][str(b)] for m, rep in zip(mine, results)]
        rows.append(row)
    return rows


def print_tables(net: Net, check: str, rows: list[dict], repeats: int) -> None:
    print(f"\n## {net.name} ({'trained Fashion-MNIST weights' if net.weights else 'random Gaussian weights'}, "
          f"plan {net.plan.relative_to(REPO)})")
    ref = net.sizes["caffemodel"]
    print(f"{'file':<40}{'bytes':>14}{'vs caffemodel':>15}")
    for key, label in SIZE_ROWS:
        print(f"{label:<40}{net.sizes[key]:>14,}{ref / net.sizes[key]:>14.1f}x")
    print(f"# onnxruntime's optimized uint8 model: {check}")
    print(f"# {repeats} repetitions, a new process per runtime each; ms: median [min..max]; load = construction; "
          "first = the first batch-1 run; MB: VmRSS (median) before load, after load, after the first run, "
          "after the timed runs, and VmHWM (peak); ratio: median [min..max] of the per-repetition ratios to "
          "pycaffe; diff: batch-1 output vs pycaffe's, relative")
    print(f"{'runtime':<35}{'load ms':>22}{'first ms':>22}{'MB: before':>11}{'load':>6}{'first':>6}{'after':>6}"
          f"{'peak':>6}{'batch 1 ms':>24}{'ratio':>23}{'batch 64 ms':>22}{'ratio':>23}{'diff':>9}")
    for r in rows:
        print(f"{r['label']:<35}{ms_spread(r['load']):>22}{ms_spread(r['first']):>22}{r['rss_before']:>11.0f}"
              f"{r['rss_built']:>6.0f}{r['rss_first']:>6.0f}{r['rss_after']:>6.0f}{r['peak']:>6.0f}"
              f"{ms_spread(r[1]):>24}{ratio_spread(r['ratio1']):>23}{ms_spread(r[64]):>22}"
              f"{ratio_spread(r['ratio64']):>23}{r['diff']:>9.1e}")


def markdown(done: list[tuple[Net, list[dict]]]) -> None:
    """The README's tables: file sizes, then per runtime and net: load, RSS, batch 1, batch 64."""
    print("\n| file | " + " | ".join(net.name for net, _ in done) + " |")
    print("|---|" + "---:|" * len(done))
    for key, label in SIZE_ROWS:
        print(f"| {label} | " + " | ".join(f"{net.sizes[key]:,} ({net.sizes['caffemodel'] / net.sizes[key]:.1f}x)"
                                            for net, _ in done) + " |")
    for net, rows in done:
        print(f"\n| {net.name} | load ms | RSS MB: loaded / after runs | batch 1 ms | vs pycaffe | batch 64 ms "
              "| vs pycaffe |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['label']} | {ms_spread(r['load'])} | {r['rss_built']:.0f} / {r['rss_after']:.0f} | "
                  f"{ms_spread(r[1])} | {ratio_spread(r['ratio1'])} | {ms_spread(r[64])} | "
                  f"{ratio_spread(r['ratio64'])} |")


def header(threads: int) -> str:
    from importlib.metadata import version

    from clipq.caffe import build

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    stamp = build.read_build_stamp()
    return (f"# machine: {cpu}, {os.cpu_count()} cores, {platform.platform()} | {datetime.date.today()} | "
            f"load average {os.getloadavg()[0]:.2f} | caffe {stamp.get('source_kind', '?')} "
            f"{stamp.get('commit', '?')[:7]} CPU | onnxruntime {version('onnxruntime')} | "
            f"opencv {version('opencv-python-headless')} | ncnn {version('ncnn')} | onnx {version('onnx')} | "
            f"numpy {np.__version__} | threads: each runtime's default, ncnn {threads}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (each starts every runtime once)")
    parser.add_argument("--nets", default="lenet5,alexnet", help="comma-separated: lenet5, alexnet")
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, 2 repetitions (for the tests)")
    parser.add_argument("--markdown", action="store_true", help="also print the README's tables")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help=argparse.SUPPRESS)
    parser.add_argument("--min-seconds", type=float, default=MIN_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.files), json.loads(args.shape), args.threads,
                                args.min_seconds)))
        return 0
    names = ["lenet5"] if args.quick else [n.strip() for n in args.nets.split(",") if n.strip()]
    repeats = 2 if args.quick else args.repeats
    if repeats < 2 or any(n not in ("lenet5", "alexnet") for n in names):
        parser.error("--repeats must be at least 2 and --nets one or both of lenet5, alexnet")
    from clipq.plan import load_plan

    print(header(args.threads), flush=True)
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in nets(names):
            build_files(net, Path(tmp))
            check = folding_check(net.files["uint8_onnx"], len(load_plan(net.plan)), Path(tmp))
            rows = summarize(repetitions(net, repeats, args.threads, QUICK_SECONDS if args.quick else MIN_SECONDS))
            print_tables(net, check, rows, repeats)
            done.append((net, rows))
    if args.markdown:
        markdown(done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
