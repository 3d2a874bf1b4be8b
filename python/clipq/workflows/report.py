"""The `clipq compress` report: report.json, report.md and the accuracy budget's rate-vs-drop plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from clipq.caffe import caffe_io
from clipq.search import budget
from clipq.search.gp import METRIC_LABELS
from clipq.storage import size
from clipq.util.atomic import atomic_write
from clipq.util.figures import pyplot, save_png
from clipq.workflows import compressed_model, onnx_output


def data_protocol(config) -> dict:
    """Which images each number comes from (the search's error, the budget, the final top-1)."""
    if config.plan is not None:
        search_on = "no search (plan given)"
    elif config.search_data == "val":
        search_on = f"validation LMDB {config.val} (held out)"
    else:
        search_on = "a random subset of the TRAIN LMDB (the paper's choice)"
    return {"search": search_on, "metric": config.settings.metric, "val": str(config.val) if config.val else None,
            "test": "the train_val's TEST Data layer", "synthetic": config.synthetic,
            "training_order": f"shuffled by seed {config.settings.seed}"}


def search_text(report: dict) -> str:
    """What the search measured and on which images, as a phrase."""
    if not report["searched"]:
        return report["data"]["search"]
    return f"{METRIC_LABELS[report['data'].get('metric', 'error')]} measured on {report['data']['search']}"


def aids_text(aids: dict) -> str:
    """The fine-tuning aids of a report, as a phrase."""
    parts = [f"{aids['epochs']:g} epochs" if aids.get("epochs") else "the solver's iterations"]
    if aids.get("ramp"):
        parts.append(f"p ramped over the first {aids['ramp']:.0%} (gradual pruning)")
    if aids.get("distill"):
        parts.append(f"distilled from the baseline at T {aids['distill']:g} (weight {aids['distill_weight']:g})")
    return ", ".join(parts)


def make_report(config, baseline: dict, result: dict, rounds: list[dict] | None, seconds: dict,
                onnx: dict | None = None) -> dict:
    """Everything the run measured, as plain JSON-able data (`onnx`: the ONNX stage's result; None: --no-onnx)."""
    packed = Path(result["clipq"])
    header, layers = compressed_model.read_file(packed)
    total = size.overall(layers)
    scores = result["scores"]
    report = {
        "model": str(config.model), "weights": str(config.weights), "solver": str(config.solver),
        "plan": result["plan"], "searched": config.plan is None, "settings": asdict(config.settings),
        "data": data_protocol(config), "aids": asdict(config.aids), "clipq": str(packed), "decoded": result["decoded"],
        "accuracy": {"baseline": baseline["test"].get("accuracy"), "clipq_net": scores["method_net"].get("accuracy"),
                     "decoded": scores["decoded"].get("accuracy")},
        "top5": {"baseline": baseline["test"].get("accuracy_top5"), "decoded": scores["decoded"].get("accuracy_top5")},
        "val_accuracy": ({"baseline": baseline["val"]["accuracy"], "decoded": scores["decoded_val"]["accuracy"],
                          "images": baseline["val"]["images"], "baseline_on_training_images":
                          baseline.get("train_sample", {}).get("accuracy"),
                          "looks_seen": budget.validation_looks_seen(baseline)}
                         if "val" in baseline else None),
        "size": {"float32_bytes": total.original, "clipq_file_bytes": packed.stat().st_size,
                 "rate": total.original / packed.stat().st_size, "huffman": header["huffman"]},
        "layers": [asdict(r) | {"rate": r.rate} for r in size.rows(layers) + [total]],
        "seconds": seconds | ({f"round {r['round']}": round(sum(r["seconds"].values()), 1) for r in rounds}
                              if rounds else result["seconds"]),
        "budget": None,
        "onnx": onnx,
    }
    if rounds:
        report["budget"] = {
            "max_drop": config.max_drop, "se_margin": config.se_margin, "rounds_allowed": config.rounds,
            "met": bool(result["met"]), "chosen": result["round"],
            "rounds": [{key: r[key] for key in ("round", "origin", "layers", "clipq_bytes", "val_drop",
                                                "val_drop_se", "test_drop", "met")}
                       | {"rate": total.original / r["clipq_bytes"]} for r in rounds]}
        plot_budget(report["budget"], config.out / "plots" / "budget.png")
    draw_net(config.model, config.out / "plots" / "net.png")
    report["plots"] = sorted(str(p) for p in (config.out / "plots").glob("*.png"))
    return report


def draw_net(prototxt: Path, path: Path) -> None:
    """The net's TEST-phase graph drawn by Caffe's own caffe.draw (pydot + graphviz), left to right."""
    if path.exists():
        return
    with atomic_write(path, "wb") as f:
        f.write(caffe_io.draw_net(caffe_io.read_net_param(prototxt)))


def plot_budget(budget: dict, path: Path) -> None:
    """Rate (log) against top-1 drop for every round: validation (with its standard error) and test."""
    plt = pyplot()
    rounds = budget["rounds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rates = [r["rate"] for r in rounds]
    ax.errorbar(rates, [r["val_drop"] for r in rounds], yerr=[r["val_drop_se"] for r in rounds], fmt="o",
                color="tab:blue", capsize=3, label="validation drop (+- 1 s.e.)")
    ax.plot(rates, [r["test_drop"] for r in rounds], "s", color="tab:green", mfc="none", label="test drop")
    for r in rounds:
        ax.annotate(str(r["round"]), (r["rate"], r["val_drop"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    chosen = next(r for r in rounds if r["round"] == budget["chosen"])
    ax.plot([chosen["rate"]], [chosen["val_drop"]], "*", color="tab:red", ms=14,
            label=f"chosen (round {chosen['round']})")
    ax.axhline(budget["max_drop"], color="tab:red", ls="--", lw=1, label=f"budget {budget['max_drop']:g} points")
    if max(rates) > 3 * min(rates):  # a log axis only where rates span a range worth one
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set(xlabel="compression rate (float32 bytes / .clipq bytes), log scale if wide", ylabel="top-1 drop (points)",
           title="accuracy budget: one point per fine-tuning round")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _plan_cell(layers: dict) -> str:
    return ", ".join(f"{name} {v['p']:.2f}/{v['b']}" for name, v in layers.items())


def budget_lines(budget: dict) -> list[str]:
    verdict = (f"round {budget['chosen']} is the smallest model that met it" if budget["met"] else
               f"**NO round met the budget**; kept round {budget['chosen']}, the smallest validation drop")
    head = ("| round | plan (layer p/b) | from | `.clipq` bytes | rate | val drop (s.e.) | test drop | meets |",
            "|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['round']} | {_plan_cell(r['layers'])} | {r['origin']} | "
            f"{r['clipq_bytes']:,} | {r['rate']:.1f}x | {r['val_drop']:+.2f} ({r['val_drop_se']:.2f}) | "
            f"{r['test_drop']:+.2f} | {'yes' if r['met'] else 'no'} |" for r in budget["rounds"]]
    return ["## Accuracy budget", "",
            f"Budget: top-1 drop of the decoded model on the validation images at most **{budget['max_drop']:g}** "
            f"points, counting the drop plus {budget['se_margin']:g} standard error(s); {len(budget['rounds'])} of "
            f"at most {budget['rounds_allowed']} rounds, bisecting the search's lambda path: {verdict}. Test drops are "
            "shown for information; no choice was made on them.", "", *head, *rows, ""]


def onnx_line(onnx: dict | None) -> str:
    """The ONNX file's line of report.md: its name and size, and its test top-1 in onnxruntime next to Caffe's."""
    if onnx is None:
        return "- ONNX: not written (--no-onnx)"
    if "refused" in onnx:
        return f"- **no ONNX**: {onnx['refused']}"
    line = "- " + onnx_output.file_summary(onnx, f"`{Path(onnx['file']).name}`")
    top1 = onnx["top1"]
    if "skipped" in top1:
        return line + f"test top-1 in onnxruntime **not measured**: {top1['skipped']}"
    if top1["equal"]:
        same = ("the same images right" if not top1["differing_images"] else
                f"{top1['differing_images']} image(s) right in one and wrong in the other")
        return (line + f"test top-1 on {top1['images']:,} images: onnxruntime **{top1['onnx']:.4f}**, Caffe on the "
                f"decoded caffemodel **{top1['caffe']:.4f}** (equal; {same})")
    return (line + f"**ONNX TOP-1 DIFFERS FROM CAFFE'S**: onnxruntime **{top1['onnx']:.4f}** "
            f"({top1['onnx_correct']:,} of {top1['images']:,} test images), Caffe on the decoded caffemodel "
            f"**{top1['caffe']:.4f}** ({top1['caffe_correct']:,}); {top1['differing_images']} image(s) differ")


def report_markdown(report: dict) -> str:
    acc = report["accuracy"]
    drop = 100 * (acc["baseline"] - acc["decoded"])
    rows = [size.Row(**{k: v for k, v in r.items() if k != "rate"}) for r in report["layers"]]
    out = Path(report["clipq"]).parent
    val = report["val_accuracy"]
    lines = [
        f"# CLIP-Q compression report: {Path(report['model']).name}",
        "",
        f"- weights: `{report['weights']}`; plan: `{report['plan']}` ({'searched' if report['searched'] else 'given'})",
        f"- search: {search_text(report)}",
        *([f"- fine-tuning: {aids_text(report['aids'])}; training order {report['data']['training_order']}"]
          if "aids" in report else []),
        f"- top-1 (test set): baseline **{acc['baseline']:.4f}**, CLIP-Q net **{acc['clipq_net']:.4f}**, "
        f"decoded plain caffemodel **{acc['decoded']:.4f}** (drop {drop:+.2f} points"
        + ("; SYNTHETIC data: random images and labels, so no accuracy means anything)"
           if report["data"].get("synthetic") else ")"),
        *([f"- top-1 (validation, {val['images']:,} held-out images): baseline {val['baseline']:.4f}, decoded "
           f"{val['decoded']:.4f} (drop {100 * (val['baseline'] - val['decoded']):+.2f} points)"] if val else []),
        *([f"- **the validation images look seen**: the baseline scores {100 * val['baseline']:.2f}% on them and "
           f"{100 * val['baseline_on_training_images']:.2f}% on as many training images; their drop counts what "
           "compression makes it forget, so the budget kept a larger model than unseen images would ask for"]
          if val and val.get("looks_seen") else []),
        *([f"- top-5: baseline **{report['top5']['baseline']:.4f}**, decoded **{report['top5']['decoded']:.4f}**"]
          if report["top5"]["baseline"] is not None else []),
        f"- size: float32 weights {size.format_bytes(report['size']['float32_bytes'])} -> "
        f"`{Path(report['clipq']).name}` {report['size']['clipq_file_bytes']:,} bytes "
        f"(**{report['size']['rate']:.1f}x**)",
        *([onnx_line(report["onnx"])] if "onnx" in report else []),
        "",
        size.render(rows, "md"),
        "",
        *(budget_lines(report["budget"]) if report["budget"] else []),
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {sec} |" for name, sec in report["seconds"].items()],
        "",
        *[f"![{Path(p).stem}]({Path(p).relative_to(out)})" for p in report["plots"]],
        "",
    ]
    return "\n".join(lines)
