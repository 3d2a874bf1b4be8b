"""`clipq compare`: CLIP-Q next to Deep Compression, Dynamic Network Surgery, Learning-Compression
pruning, the sequential ablation and uniform CLIP-Q, on one net, in one protocol (the paper's Table 4
question asked on a net a CPU can train).

Protocol: the same baseline caffemodel; the same fine-tuning solver and the same total number of
iterations for every method (a method with several phases runs the solver's schedule compressed into
each phase); the same `.clipq` codec for every result; the same held-out validation LMDB for the search
and for every fine-tuning's monitor; the test set only for the final numbers.

Operating points. CLIP-Q: plans of the search's Lagrangian path (`budget`) nearest to the target rates.
Every baseline is placed at the *size* of CLIP-Q's smaller points by its own size knob (each method's
`operating_points`, in `clipq.methods`), bisected until its plan, encoded from the baseline weights, is as
large as CLIP-Q's: Deep Compression scales its paper's per-layer kept fractions at its paper's bits (and
also runs the paper's setting as published); DNS scales its paper's per-layer kept fractions, each turned
into a c_rate on the baseline weights; LC chooses the global kappa; uniform CLIP-Q takes one (p, b) for
every layer; the sequential ablation takes CLIP-Q's plans themselves. Sizes after training move a little
(DNS and LC decide their own sparsity); the table reports real bytes.

Equal tuning. At every operating point every method gets the same number of fine-tuned trials (`trials`): the
settings it offers (`OperatingPoint.trials`: DC's shapes and pruning rounds, DNS's surgery length, LC's mu
schedules, uniform CLIP-Q's bits), topped up with learning-rate variants (LR_FACTORS) when it offers fewer. A
trial fine-tunes `trial_share` of the iterations and is scored on the validation images only; the trial with
the smallest validation drop runs again at the full budget, and only that run is scored on the test set.
Evaluations without fine-tuning are free for every method (CLIP-Q's search, DC's sensitivity scan, the size
bisections), all on the validation images.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from clipq.caffe import caffe_io, caffemodel
from clipq.methods import METHODS
from clipq.methods.base import STORE_BITS, Method, OperatingPoint, Placement, Trial, lr_variant, stored_at
from clipq.plan import LayerPlan, load_plan
from clipq.search import budget, job, subset_eval
from clipq.search.log import read_histories
from clipq.storage import size
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError
from clipq.util.figures import pyplot, save_png
from clipq.util.lock import output_directory
from clipq.workflows import compressed_model, pipeline
from clipq.workflows.compressed_model import SizeModel

# The paper's Table 4 (AlexNet on ImageNet): method, top-1 change, size (Huffman-coded in brackets).
PAPER_TABLE4 = [
    ("Uncompressed", "-", "243.9 MB"), ("Dynamic Network Surgery", "-0.2%", "13.8 MB"),
    ("Deep Compression", "+0.0%", "8.9 (6.9) MB"), ("Deep Compression + Weighted-Entropy Quantization", "-0.8%",
                                                   "8.3 (6.5) MB"),
    ("Binary-Weight-Networks", "+0.1%", "7.6 MB"), ("CLIP-Q", "+0.7%", "4.8 MB"),
]


@dataclass(frozen=True)
class CompareConfig:
    compress: pipeline.CompressConfig   # model, weights, solver, val, out, search settings, progress
    targets: tuple[float, ...] = (30.0, 60.0, 120.0)  # CLIP-Q's points: the path plans nearest these rates
    matched: int = 2                    # baselines at the sizes of CLIP-Q's `matched` smallest points
    methods: tuple[str, ...] = METHODS.names()
    options: dict[str, dict] = field(default_factory=dict)  # per method: its knobs (e.g. {"lc": {"steps": 5}})
    trials: int = 4                     # fine-tuned trials per method and operating point (1: no tuning)
    trial_share: float = 0.25           # a trial's share of the fine-tuning iterations

    def check(self) -> None:
        self.compress.check()
        if self.compress.val is None:
            raise ClipqError("clipq compare needs --val LMDB: the search and the fine-tuning monitor held-out images")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ClipqError(f"--methods: unknown method(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(METHODS.names())}")
        if "clipq" not in self.methods:
            raise ClipqError("--methods must include clipq: the other methods are placed at its sizes")
        if not self.targets or any(t <= 1 for t in self.targets):
            raise ClipqError(f"--targets must be compression rates above 1, got {self.targets}")
        if self.trials < 1 or not 0 < self.trial_share <= 1:
            raise ClipqError(f"--trials must be at least 1 and --trial-share in (0, 1], got {self.trials} and "
                             f"{self.trial_share}")


LR_FACTORS = (2.0, 0.5, 4.0, 0.25)  # learning-rate variants that top up a method's own trials
BITS_TOLERANCE = 0.1  # validation top-1 points fewer bits may lose against STORE_BITS (the "bits after training" rows)
FEWEST_BITS = 2


@dataclass(frozen=True)
class Point:
    method: str        # a registered method's NAME
    slot: str          # which operating point, the same across seeds: "CLIP-Q point 2", "paper setting", ...
    trials: tuple[Trial, ...]  # the settings tried, each at the trials' length
    final: tuple[Trial, ...]   # the same settings at the full length (the chosen one runs)


def tuned(trials: tuple[Trial, ...], count: int) -> tuple[Trial, ...]:
    """`count` trials: the method's own first, then learning-rate variants of them (LR_FACTORS, in order)."""
    out = list(trials[:count])
    for factor in LR_FACTORS:
        for trial in trials:
            if len(out) == count:
                return tuple(out)
            out.append(lr_variant(trial, factor))
    return tuple(out)


def clipq_points(histories: dict, sizes: SizeModel, targets: tuple[float, ...]) -> list[dict[str, LayerPlan]]:
    """The plans nearest (in log rate) to each target rate, without repeats, largest first: the Lagrangian
    path's, with plans interpolated where the path leaves gaps (as the accuracy budget's rounds do)."""
    plans = [c.plan for c in budget.densified(budget.path_candidates(budget.lagrangian_path(histories)))]
    rates = [sizes.rate(p) for p in plans]
    chosen = sorted({int(np.argmin([abs(math.log(r / t)) for r in rates])) for t in targets},
                    key=lambda i: rates[i])
    return [plans[i] for i in chosen]


def operating_points(config: CompareConfig, net_name: str, sizes: SizeModel, histories: dict, iterations: int,
                     error_of) -> list[Point]:
    """Every method's operating points, each placed by the method's own size knob (module docstring), with its
    trials at the trials' length and at the full length."""
    place = Placement(net_name, {n: sizes.blobs[n][0] for n in sizes.layers},
                      clipq_points(histories, sizes, config.targets), config.matched, sizes.bytes, sizes.original,
                      iterations, config.compress.settings.seed, config.options, error_of)
    short = replace(place, iterations=trial_iterations(config, iterations))
    points = []
    for name in config.methods:
        full: list[OperatingPoint] = METHODS[name].operating_points(place)
        trial: list[OperatingPoint] = METHODS[name].operating_points(short) if config.trials > 1 else full
        points += [Point(name, f.slot, tuned(t.trials, config.trials), tuned(f.trials, config.trials))
                   for f, t in zip(full, trial)]
    return points


def run_trial(short, nets, work: Path, trial: Trial, baseline_correct: np.ndarray, log) -> dict:
    """One trial at the trials' length, scored on the validation images only; a diverged one is recorded as such
    (it is never chosen)."""
    stages = pipeline.Stages(work)
    try:
        pipeline.compress_method(short, nets, stages, trial.make(), Path(short.weights), log, test=False)
    except pipeline.Diverged as error:
        log(f"[compare] trial diverged: {error}")
        return {"label": trial.label, "val_drop": None, "val_drop_se": None, "diverged": True,
                "seconds": round(sum(stages.seconds().values()), 1)}
    drop = budget.paired_drop(baseline_correct, np.load(work / "val_correct.npy"))
    return {"label": trial.label, "val_drop": drop.points, "val_drop_se": drop.se, "diverged": False,
            "seconds": round(sum(stages.seconds().values()), 1)}


def trial_iterations(config: CompareConfig, iterations: int) -> int:
    return max(1, round(iterations * config.trial_share))


def held_out_error(config: CompareConfig, out: Path, log) -> Callable[[dict[str, np.ndarray]], float]:
    """Top-1 error (%) on a subset of the validation images with some layers' weights replaced, no fine-tuning
    (memoised on the weights' bytes): the free evaluations a method's placement may use."""
    cc = config.compress
    settings = replace(cc.settings, metric="error")
    scan_job, _ = job.prepare(cc.model, cc.weights, out / "sensitivity", None, settings, str(cc.val), log)
    evaluator = subset_eval.SubsetEvaluator(scan_job.eval_prototxt, cc.weights, scan_job.blobs,
                                            scan_job.settings.subset, "error")
    memo: dict[str, float] = {}

    def error_of(replaced: dict[str, np.ndarray]) -> float:
        key = hashlib.sha256(b"".join(n.encode() + np.ascontiguousarray(w, np.float32).tobytes()
                                      for n, w in sorted(replaced.items()))).hexdigest()
        if key not in memo:
            memo[key] = evaluator.with_weights(replaced)
        return memo[key]

    return error_of


def run(config: CompareConfig, log=print) -> dict:
    """Run (or resume) the comparison; write OUT/compare.json, compare.md and plots/compare.png."""
    config.check()
    with output_directory(config.compress.out, log):
        return _compare(config, log)


def _compare(config: CompareConfig, log) -> dict:
    cc = config.compress
    out = cc.out
    stages = pipeline.Stages(out)
    nets = pipeline.prepare_nets(cc, log)
    baseline = pipeline.baseline_and_plan(cc, stages, nets, log)
    net = caffe_io.read_net_param(cc.model)
    layers = list(load_plan(out / "plan.yaml"))
    sizes = SizeModel(Path(cc.weights), layers)
    solver = caffe_io.read_text_proto(cc.solver, "SolverParameter", "solver prototxt")
    iterations = cc.max_iter or solver.max_iter
    points = operating_points(config, net.name, sizes, read_histories(out, layers), iterations,
                              held_out_error(config, out, log))
    baseline_correct = np.load(out / "baseline_val_correct.npy")
    short = replace(cc, max_iter=trial_iterations(config, iterations))
    rows = []
    for number, point in enumerate(points, 1):
        work = out / "runs" / f"{number:02d}-{point.method}"
        label = METHODS[point.method].LABEL
        tried = []
        if len(point.trials) > 1:
            for k, trial in enumerate(point.trials, 1):
                log(f"[compare {number}/{len(points)}, trial {k}/{len(point.trials)}] {label}, {trial.label}")
                tried.append(run_trial(short, nets, work / "trials" / str(k), trial, baseline_correct, log))
        chosen = int(np.argmin([np.inf if t["diverged"] else t["val_drop"] for t in tried])) if tried else 0
        final = point.final[chosen]
        log(f"[compare {number}/{len(points)}] {label}, {final.label}")
        result = pipeline.compress_method(cc, nets, pipeline.Stages(work), final.make(), Path(cc.weights), log)
        row = {"method": point.method, "label": label, "slot": point.slot, "point": final.label,
               **scored(result, baseline, baseline_correct, work), "iterations": iterations,
               "trials": tried, "chosen": chosen + 1,
               "seconds": round(sum(result["seconds"].values()) + sum(t["seconds"] for t in tried), 1), "dir": str(work)}
        rows.append(row)
        if not METHODS[point.method].QUANTIZES:
            rows.append(rebit_row(config, nets, final.make(), result, row, baseline, baseline_correct, log))
    report = {"model": str(cc.model), "net": net.name, "seed": cc.settings.seed, "weights": str(cc.weights),
              "solver": str(cc.solver), "iterations": iterations,
              "baseline": {"test_top1": baseline["test"]["accuracy"],
                                                     "val_top1": baseline["val"]["accuracy"]},
              "settings": asdict(cc.settings), "targets": list(config.targets), "rows": rows,
              "trials": config.trials, "trial_iterations": trial_iterations(config, iterations) if config.trials > 1 else 0,
              "seconds": round(sum(stages.seconds().values()) + sum(r["seconds"] for r in rows), 1)}
    plot(report, out / "plots" / "compare.png")
    with atomic_write(out / "compare.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "compare.md") as f:
        f.write(markdown(report))
    return report


def scored(result: dict, baseline: dict, baseline_correct: np.ndarray, work: Path) -> dict:
    """A run's size and scores as a table row has them."""
    drop = budget.paired_drop(baseline_correct, np.load(work / "val_correct.npy"))
    _, stored = compressed_model.read_file(result["clipq"])
    return {"bytes": result["clipq_bytes"], "rate": size.overall(stored).original / result["clipq_bytes"],
            "test_top1": result["scores"]["decoded"]["accuracy"],
            "test_drop": 100 * (baseline["test"]["accuracy"] - result["scores"]["decoded"]["accuracy"]),
            "val_drop": drop.points, "val_drop_se": drop.se}


def rebit_row(config: CompareConfig, nets, method: Method, result: dict, row: dict, baseline: dict,
              baseline_correct: np.ndarray, log) -> dict:
    """The row of a method that does not quantize stored with each layer's bits chosen after training
    (`bits_after_training`) instead of STORE_BITS: the same trained weights, encoded again."""
    cc = config.compress
    work = Path(row["dir"]) / "bits_after_training"
    stages = pipeline.Stages(work)
    bits = stages.run("choose-bits", {"trained": pipeline.file_id(Path(result["trained"])),
                                      "decoded": pipeline.file_id(Path(result["decoded"])),
                                      "tolerance": BITS_TOLERANCE}, [],
                      lambda: bits_after_training(cc, method, result, work), log)
    method.store_bits = bits
    method.settings = {**method.settings, "store_bits": bits}
    pipeline.set_biases(method, nets)
    rebit = pipeline.package(cc, nets, stages, method, Path(result["trained"]), Path(result["test_net"]), log)
    return {**row, "label": f"{row['label']}, bits after training", "slot": f"{row['slot']}, bits after training",
            "point": f"{row['point']}; bits " + " ".join(f"{n} {b}" for n, b in bits.items()),
            **scored(rebit, baseline, baseline_correct, work), "trials": [], "chosen": None,
            "seconds": round(sum(stages.seconds().values()), 1), "dir": str(work)}


def bits_after_training(cc, method, result: dict, work: Path) -> dict[str, int]:
    """Per layer, in net order, the fewest bits (linear levels) whose model loses at most BITS_TOLERANCE points of
    validation top-1 against the STORE_BITS one, the earlier layers' choices kept."""
    trained = {w.name: w.blobs for w in caffemodel.read(result["trained"]) if w.name in method.layers()}
    weights = method.pruned_weights(trained)
    evaluator = validation_evaluator(cc, Path(result["decoded"]), work)
    reference = evaluator.with_weights({})
    chosen: dict[str, int] = {}
    for name in weights:
        for bits in range(FEWEST_BITS, STORE_BITS + 1):
            candidate = {**chosen, name: bits}
            replaced = {n: stored_at(weights[n], b).weights for n, b in candidate.items()}
            if bits == STORE_BITS or evaluator.with_weights(replaced) <= reference + BITS_TOLERANCE:
                chosen[name] = bits
                break
    return chosen


def validation_evaluator(cc, weights: Path, work: Path) -> subset_eval.SubsetEvaluator:
    """Top-1 error on the whole validation LMDB (to a multiple of the eval batch) with `weights`."""
    count = subset_eval.usable_count(caffe_io.lmdb_entries(cc.val, "validation LMDB (--val)"))
    net, blobs = subset_eval.eval_net_param(caffe_io.read_net_param(cc.model), Path(cc.val).resolve(), count,
                                            str(cc.model))
    prototxt = work / "val_net.prototxt"
    with atomic_write(prototxt) as f:
        f.write(str(net))
    return subset_eval.SubsetEvaluator(prototxt, weights, blobs, count, "error")


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats in both rate and test top-1, by rate."""
    ordered = sorted(rows, key=lambda r: (-r["rate"], -r["test_top1"]))
    best, out = -1.0, []
    for r in ordered:
        if r["test_top1"] > best:
            out.append(r)
            best = r["test_top1"]
    return sorted(out, key=lambda r: r["rate"])


PLOT_RANGE = 15.0  # points below the baseline the plot shows; lower results sit on its floor, labelled


def plot(report: dict, path: Path) -> None:
    """Rate (log x) against test top-1, one colour per method, each method's frontier as a line."""
    plt = pyplot()
    baseline = 100 * report["baseline"]["test_top1"]
    floor = max(min(100 * r["test_top1"] for r in report["rows"]) - 1, baseline - PLOT_RANGE)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    on_floor: dict[int, int] = {}  # labels at about the same rate stack upwards
    for method in METHODS.names():
        rows = [r for r in report["rows"] if r["method"] == method]
        if not rows:
            continue
        line = frontier(rows)
        marker = "*" if method == "clipq" else "o"
        shown = [max(100 * r["test_top1"], floor) for r in line]
        handle = ax.plot([r["rate"] for r in line], shown, marker=marker, markersize=12 if method == "clipq" else 6,
                         label=METHODS[method].LABEL)[0]
        for r in rows:
            top1 = 100 * r["test_top1"]
            ax.scatter(r["rate"], max(top1, floor), color=handle.get_color(), s=30,
                       marker=marker if top1 >= floor else "v")
            if top1 < floor:
                bucket = round(10 * math.log10(r["rate"]))
                on_floor[bucket] = on_floor.get(bucket, 0) + 1
                ax.annotate(f"{top1:.1f}%", (r["rate"], floor), textcoords="offset points",
                            xytext=(4, 10 * on_floor[bucket] - 6), fontsize=7, color=handle.get_color())
    ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="uncompressed baseline")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}x" if str(int(x))[0] in "2358" else ""))
    ax.set_ylim(floor - 0.5, baseline + 1.5)
    ax.set_xlabel("compression rate (float32 bytes / .clipq bytes, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{report['net']} (seed {report.get('seed', 0)}): {report['iterations']:,} fine-tuning iterations "
                 "per method", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def trial_result(trial: dict) -> str:
    if trial.get("diverged"):
        return "diverged (NaN or Inf weights)"
    return f"{trial['val_drop']:+.2f} +- {trial['val_drop_se']:.2f}"


def trial_column(row: dict) -> str:
    """Which trial the row is ("2 of 4"); "-" for a row that re-encodes another's trained weights."""
    return f"{row['chosen']} of {len(row['trials'])}" if row.get("trials") else "-"


def tuning_sentence(report: dict) -> str:
    if not report.get("trial_iterations"):
        return "One run per method and operating point (no tuning trials)."
    return (f"Every method and operating point had {report['trials']} fine-tuned trials of "
            f"{report['trial_iterations']:,} iterations, scored on the validation images only; the trial with the "
            "smallest validation drop ran again at the full length and is the row (column `trial`).")


def markdown(report: dict) -> str:
    lines = [f"# {report['net']}: CLIP-Q and the baselines ({report['model']})", "",
             f"Baseline test top-1 {100 * report['baseline']['test_top1']:.2f}%; every method fine-tunes "
             f"{report['iterations']:,} iterations with {report['solver']}; sizes are `.clipq` files; drops in "
             "top-1 points (validation: mean +- standard error over the held-out images).", "",
             tuning_sentence(report), "",
             "| method | operating point | bytes | rate | test top-1 | test drop | val drop | trial | time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['label']} | {r['point']} | {r['bytes']:,} | {r['rate']:.1f}x | "
                     f"{100 * r['test_top1']:.2f}% | {r['test_drop']:+.2f} | {r['val_drop']:+.2f} +- "
                     f"{r['val_drop_se']:.2f} | {trial_column(r)} | "
                     f"{r['seconds']:.0f} s |")
    tuned_rows = [r for r in report["rows"] if r.get("trials")]
    if tuned_rows:
        lines += ["", "The trials (validation drop after the trial's iterations; the chosen one in bold):", ""]
        for r in tuned_rows:
            lines.append(f"- {r['label']}, {r['slot']}:")
            lines += [f"  - {'**' if k == r['chosen'] else ''}{t['label']}: {trial_result(t)}"
                      f"{'**' if k == r['chosen'] else ''}" for k, t in enumerate(r["trials"], 1)]
    lines += ["", "The paper's Table 4 (AlexNet on ImageNet, as printed):", "",
              "| method | top-1 change | size |", "|---|---:|---:|"]
    lines += [f"| {m} | {d} | {s} |" for m, d, s in PAPER_TABLE4]
    return "\n".join(lines) + "\n"
