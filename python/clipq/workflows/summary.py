"""`clipq summary`: several `clipq compress` runs (e.g. seeds) of the same nets as one table, mean and
min-max, so that a result is reported with its spread rather than as one run; or several `clipq compare`
runs, one row per net, method and operating point."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from clipq.methods import METHODS
from clipq.util.errors import ClipqError
from clipq.util.json_file import read_object


REPORT_FIELDS = {"report.json": {"model": str, "accuracy": dict, "size": dict, "settings": dict},
                 "compare.json": {}}


def load_reports(directories: list[Path]) -> list[dict]:
    """The report.json of each `clipq compress` output directory (compare.json of a `clipq compare` one)."""
    reports = []
    for directory in directories:
        name = "compare.json" if (Path(directory) / "compare.json").exists() else "report.json"
        path = Path(directory) / name
        report = read_object(path, REPORT_FIELDS[name], f"{path}: cannot read; is {directory} a finished "
                             "`clipq compress` (or `clipq compare`) --out?")
        if name == "report.json":
            _check_report(report, path)
        reports.append(report | {"out": str(directory), "kind": name})
    return reports


def _check_report(report: dict, path: Path) -> None:
    """The numbers `run_facts` reads."""
    numbers = {"accuracy": ("baseline", "decoded"), "size": ("rate", "clipq_file_bytes"), "settings": ("seed",)}
    for group, keys in numbers.items():
        for key in keys:
            value = report[group].get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ClipqError(f"{path}: field '{group}.{key}' is {value!r}, expected a number")


def run_facts(report: dict) -> dict:
    """The numbers of one run that the table aggregates."""
    acc = report["accuracy"]
    budget = report.get("budget")
    return {
        "rate": report["size"]["rate"], "bytes": report["size"]["clipq_file_bytes"],
        "baseline": 100 * acc["baseline"], "decoded": 100 * acc["decoded"],
        "test_drop": 100 * (acc["baseline"] - acc["decoded"]),
        "val_drop": (100 * (report["val_accuracy"]["baseline"] - report["val_accuracy"]["decoded"])
                     if report.get("val_accuracy") else None),
        "met": budget["met"] if budget else None, "rounds": len(budget["rounds"]) if budget else None,
        "max_drop": budget["max_drop"] if budget else None, "seed": report["settings"]["seed"],
    }


def _spread(values: list[float], fmt: str) -> str:
    a = np.asarray(values, dtype=float)
    return f"{fmt.format(a.mean())} ({fmt.format(a.min())} .. {fmt.format(a.max())})"


def table(reports: list[dict]) -> str:
    """Markdown: one row per net (the train_val's name), mean (min .. max) over its runs."""
    kinds = {report.get("kind", "report.json") for report in reports}
    if len(kinds) > 1:
        raise ClipqError("give either `clipq compress` or `clipq compare` output directories, not both")
    if kinds == {"compare.json"}:
        return compare_table(reports)
    by_net: dict[str, list[dict]] = defaultdict(list)
    for report in reports:
        by_net[report["model"]].append(run_facts(report))
    head = ["| net | runs (seeds) | baseline top-1 % | decoded top-1 % | test drop (points) | val drop (points) | "
            "`.clipq` bytes | rate | budget met |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for model, runs in by_net.items():
        val = [r["val_drop"] for r in runs if r["val_drop"] is not None]
        met = [r["met"] for r in runs if r["met"] is not None]
        budget = f"{sum(met)}/{len(met)} (<= {runs[0]['max_drop']:g})" if met else "no budget"
        rows.append(
            f"| {Path(model).parent.name or Path(model).name} "
            f"| {len(runs)} ({', '.join(str(r['seed']) for r in runs)}) "
            f"| {_spread([r['baseline'] for r in runs], '{:.2f}')} | {_spread([r['decoded'] for r in runs], '{:.2f}')} "
            f"| {_spread([r['test_drop'] for r in runs], '{:+.2f}')} "
            f"| {_spread(val, '{:+.2f}') if val else 'n/a'} | {_spread([r['bytes'] for r in runs], '{:,.0f}')} "
            f"| {_spread([r['rate'] for r in runs], '{:.1f}x')} | {budget} |")
    return "\n".join(head + rows)


def compare_table(reports: list[dict]) -> str:
    """Markdown: one row per net, method and operating point of `clipq compare` runs, mean (min .. max)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for report in reports:
        for row in report["rows"]:
            groups[(Path(report["model"]).parent.name, row["method"], row["slot"])].append(
                row | {"seed": report.get("seed"), "baseline": report["baseline"]["test_top1"]})
    head = ["| net | method | operating point | runs (seeds) | `.clipq` bytes | rate | test top-1 % | test drop "
            "(points) |", "|---|---|---|---|---|---|---|---|"]
    rows = [f"| {net} | {METHODS[method].LABEL} | {slot} | {len(runs)} ({', '.join(str(r['seed']) for r in runs)}) "
            f"| {_spread([r['bytes'] for r in runs], '{:,.0f}')} | {_spread([r['rate'] for r in runs], '{:.1f}x')} "
            f"| {_spread([100 * r['test_top1'] for r in runs], '{:.2f}')} "
            f"| {_spread([r['test_drop'] for r in runs], '{:+.2f}')} |"
            for (net, method, slot), runs in groups.items()]
    return "\n".join(head + rows)
