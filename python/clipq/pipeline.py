"""`clipq compress`: the whole CLIP-Q pipeline on a Caffe model, stage by stage, resumable.

baseline evaluation -> search (p, b) -> convert to CLIP-Q layers -> fine-tune with `caffe train` ->
export -> encode (.clipq) -> decode -> evaluate the decoded plain caffemodel with plain Caffe -> report.

Every stage records in `<out>/stages.json` a hash of its inputs (files and settings) and how long it
took; a stage whose outputs exist and whose inputs did not change is skipped, so rerunning the command
continues where it stopped (the search and the fine-tuning also resume inside their stage).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from clipq import caffe_io, compressed_model, convert, search, size, train
from clipq.atomic import atomic_write
from clipq.errors import ClipqError
from clipq.plan import load_plan


@dataclass(frozen=True)
class CompressConfig:
    model: Path              # plain train_val prototxt (TRAIN/TEST LMDB Data layers, TEST Accuracy)
    weights: Path            # trained plain caffemodel
    solver: Path             # fine-tuning solver: its net and snapshot_prefix are replaced
    out: Path
    plan: Path | None = None  # given (p, b): no search
    settings: search.SearchSettings = field(default_factory=search.SearchSettings)
    jobs: int = 1
    max_iter: int | None = None  # overrides the solver's
    huffman: bool = False
    progress: bool = True


def file_id(path: Path) -> str:
    """Content hash for small files; size + first/last MB for big ones (caffemodels)."""
    path = Path(path)
    if path.stat().st_size < (4 << 20):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return search.model_id(path)


class Stages:
    """Runs named stages, skipping those whose recorded inputs match and whose outputs exist."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], object], log=print):
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = self.record.get(name, {})
        if done.get("inputs") == key and all(Path(o).exists() for o in outputs):
            log(f"[{name}] up to date, skipped")
            return done.get("result")
        log(f"[{name}] ...")
        start = time.perf_counter()
        result = fn()
        self.record[name] = {"inputs": key, "seconds": round(time.perf_counter() - start, 1), "result": result}
        with atomic_write(self.path) as f:
            json.dump(self.record, f, indent=2, default=str)
        log(f"[{name}] done in {self.record[name]['seconds']} s")
        return result

    def seconds(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.record.items()}


def absolute_sources(net_param, base: Path) -> None:
    """Make relative Data-layer sources absolute (the fine-tuning may run from another directory)."""
    for layer in net_param.layer:
        if layer.type == "Data" and layer.data_param.source and not Path(layer.data_param.source).is_absolute():
            layer.data_param.source = str((base / layer.data_param.source).resolve())


def finetune_solver(config: CompressConfig, net: Path, out: Path) -> Path:
    """The user's solver pointed at the CLIP-Q net, snapshotting under out/finetune/."""
    param = caffe_io.read_text_proto(config.solver, "SolverParameter", "solver prototxt")
    param.net = str(net.resolve())
    param.ClearField("train_net")
    param.snapshot_prefix = str((out / "finetune" / "clipq").resolve())
    if config.max_iter is not None:
        param.max_iter = config.max_iter
    if param.max_iter <= 0:
        raise ClipqError(f"{config.solver}: max_iter must be positive")
    path = out / "finetune_solver.prototxt"
    with atomic_write(path) as f:
        f.write(f"# {config.solver} for `clipq compress` (net and snapshot_prefix replaced)\n{param}")
    return path


def run(config: CompressConfig, log=print) -> dict:
    """Run (or resume) the pipeline; return the report (also written as report.json / report.md)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    cwd = Path.cwd()
    plain = caffe_io.read_net_param(config.model)
    absolute_sources(plain, cwd)
    plain_path = out / "plain_train_val.prototxt"
    with atomic_write(plain_path) as f:
        f.write(str(plain))
    model_in = {"model": file_id(plain_path), "weights": file_id(config.weights)}

    baseline = stages.run("baseline", model_in, [], lambda: caffe_io.evaluate(plain_path, config.weights), log)

    plan_path = out / "plan.yaml"

    def copy_plan():
        with atomic_write(plan_path) as f:
            f.write(Path(config.plan).read_text())

    def search_plan():
        search.run(plain_path, config.weights, out, None, config.settings, config.jobs, progress=config.progress)

    if config.plan is not None:
        stages.run("search", {"plan": file_id(config.plan)}, [plan_path], copy_plan, log)
    else:
        stages.run("search", {**model_in, "settings": asdict(config.settings)}, [plan_path], search_plan, log)
    plan = load_plan(plan_path)

    clipq_path = out / "clipq_train_val.prototxt"
    stages.run("convert", {"model": model_in["model"], "plan": file_id(plan_path)}, [clipq_path],
               lambda: convert.convert_file(plain_path, plan, clipq_path), log)

    finetuned = out / "finetuned.caffemodel"
    solver = finetune_solver(config, clipq_path, out)
    stages.run("finetune", {"net": file_id(clipq_path), "solver": file_id(solver), **model_in}, [finetuned],
               lambda: str(train.train(solver, output=finetuned, weights=config.weights,
                                       log=out / "finetune.log", progress=config.progress)), log)

    exported = out / "exported.caffemodel"
    stages.run("export", {"net": file_id(clipq_path), "weights": file_id(finetuned)}, [exported],
               lambda: convert.export(clipq_path, finetuned, exported), log)

    packed = out / "model.clipq"

    def encode():
        compressed_model.encode_file(plain_path, exported, packed, plan, config.huffman)

    stages.run("encode", {"weights": file_id(exported), "plan": file_id(plan_path), "huffman": config.huffman},
               [packed], encode, log)

    decoded = out / "decoded.caffemodel"

    def decode():
        compressed_model.decode_file(packed, decoded)

    stages.run("decode", {"clipq": file_id(packed)}, [decoded], decode, log)

    def evaluate():
        # One net at a time: the rc3 fallback build cannot have two nets reading one LMDB at once.
        return {"clipq_net": caffe_io.evaluate(clipq_path, finetuned),
                "decoded": caffe_io.evaluate(plain_path, decoded)}

    scores = stages.run("evaluate", {"decoded": file_id(decoded), "finetuned": file_id(finetuned)}, [],
                        evaluate, log)

    report = make_report(config, baseline, scores, packed, plan_path, stages.seconds())
    with atomic_write(out / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(report, packed))
    return report


def make_report(config: CompressConfig, baseline: dict, scores: dict, packed: Path, plan_path: Path,
                seconds: dict) -> dict:
    header, layers = compressed_model.read_file(packed)
    total = size.overall(layers)
    original = total.original
    return {
        "model": str(config.model), "weights": str(config.weights), "solver": str(config.solver),
        "plan": str(plan_path), "searched": config.plan is None, "settings": asdict(config.settings),
        "accuracy": {"baseline": baseline.get("accuracy"), "clipq_net": scores["clipq_net"].get("accuracy"),
                     "decoded": scores["decoded"].get("accuracy")},
        "top5": {"baseline": baseline.get("accuracy_top5"), "decoded": scores["decoded"].get("accuracy_top5")},
        "size": {"float32_bytes": original, "clipq_file_bytes": packed.stat().st_size,
                 "rate": original / packed.stat().st_size, "huffman": header["huffman"]},
        "layers": [asdict(r) | {"rate": r.rate} for r in size.rows(layers) + [total]],
        "seconds": seconds,
        "plots": sorted(str(p) for p in (config.out / "plots").glob("*.png")),
    }


def report_markdown(report: dict, packed: Path) -> str:
    acc = report["accuracy"]
    drop = 100 * (acc["baseline"] - acc["decoded"])
    rows = [size.Row(**{k: v for k, v in r.items() if k != "rate"}) for r in report["layers"]]
    lines = [
        f"# CLIP-Q compression report: {Path(report['model']).name}",
        "",
        f"- weights: `{report['weights']}`; plan: `{report['plan']}` ({'searched' if report['searched'] else 'given'})",
        f"- top-1 (test set): baseline **{acc['baseline']:.4f}**, CLIP-Q net **{acc['clipq_net']:.4f}**, "
        f"decoded plain caffemodel **{acc['decoded']:.4f}** (drop {drop:+.2f} points)",
        *([f"- top-5: baseline **{report['top5']['baseline']:.4f}**, decoded **{report['top5']['decoded']:.4f}**"]
          if report["top5"]["baseline"] is not None else []),
        f"- size: float32 weights {size.format_bytes(report['size']['float32_bytes'])} -> "
        f"`{packed.name}` {report['size']['clipq_file_bytes']:,} bytes (**{report['size']['rate']:.1f}x**)",
        "",
        size.render(rows, "md"),
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {sec} |" for name, sec in report["seconds"].items()],
        "",
        *[f"![{Path(p).stem}]({Path(p).relative_to(packed.parent)})" for p in report["plots"]],
        "",
    ]
    return "\n".join(lines)
