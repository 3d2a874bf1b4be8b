"""Storage accounting and the paper-style layerwise tables (Layer, p, b, Original, Compressed, Rate).

Original = float32 weights + biases (32 bits per parameter), as in the paper's Tables 1-3.
Compressed = the real size of the layer in the `.clipq` file (index and code streams, codebook,
bias), never a formula. KB / MB are 1000-based, like the paper's.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import yaml

from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


@dataclass(frozen=True)
class Row:
    layer: str
    p: float | None
    bits: int | None
    original: int      # bytes
    compressed: int    # bytes
    paper_compressed: float | None = None  # bytes, from the paper's table when compared

    @property
    def rate(self) -> float:
        return self.original / self.compressed if self.compressed else float("inf")


def layer_bits(layer: Layer) -> dict:
    """Where a compressed layer's bits go: entries, k, index / code / codebook / bias bytes."""
    f = layer.facts
    index, codes, codebook, other = f["stream_bytes"]
    return {"k": f["k"], "entries": f["entries"], "nonzero": f["nonzero"], "index_bytes": index,
            "code_bytes": codes, "codebook_bytes": codebook, "bias_bytes": other}


def rows(layers: list[Layer], compressed_only: bool = True) -> list[Row]:
    """One row per compressed layer (or per layer with blobs)."""
    out = []
    for layer in layers:
        if compressed_only and layer.facts.get("encoding") != "sparse":
            continue
        original = 4 * sum(int(b.size) for b in layer.blobs)
        out.append(Row(layer.name, layer.facts.get("p"), layer.facts.get("bits"), original, layer.facts["length"]))
    return out


def overall(layers: list[Layer]) -> Row:
    """All layers together (raw ones count in both columns), like the paper's Overall row."""
    everything = rows(layers, compressed_only=False)
    return Row("Overall", None, None, sum(r.original for r in everything), sum(r.compressed for r in everything))


def format_bytes(n: float) -> str:
    """1000-based, like the paper's tables: 9.12 KB, 35.1 KB, 204 KB, 1.80 MB, 151.0 MB, 243.9 MB."""
    for unit in ("GB", "MB", "KB"):
        if n >= UNITS[unit]:
            value = n / UNITS[unit]
            decimals = 2 if value < 10 else 1 if value < 100 or unit != "KB" else 0
            return f"{value:.{decimals}f} {unit}"
    return f"{n:.0f} B"


def format_rate(rate: float) -> str:
    """51x, 9.5x, 0.5x: whole numbers from 10 on, one decimal below (a layer can also grow)."""
    return f"{rate:.0f}x" if rate >= 10 else f"{rate:.1f}x"


def parse_size(text: str) -> float:
    """'140 KB' -> 140000.0 (the paper's 1000-based units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB)\s*", str(text))
    if not m:
        raise ValueError(f"not a size like '140 KB': {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def paper_sizes(plan_file) -> dict:
    """The `paper_sizes` mapping of a paper_params.yaml ({layer: {original, compressed, rate}})."""
    with open(plan_file) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("paper_sizes"), dict):
        raise ClipqError(f"{plan_file}: has no paper_sizes to compare with")
    return doc["paper_sizes"]


def with_paper(table: list[Row], paper_sizes: dict) -> list[Row]:
    """Attach the paper's Compressed column (from a paper_params.yaml 'paper_sizes' mapping)."""
    out = []
    for row in table:
        printed = paper_sizes.get(row.layer)
        paper = parse_size(printed["compressed"]) if printed else None
        out.append(Row(row.layer, row.p, row.bits, row.original, row.compressed, paper))
    return out


def _cells(row: Row) -> list[str]:
    cells = [row.layer, "" if row.p is None else f"{row.p:.2f}", "" if row.bits is None else str(row.bits),
             format_bytes(row.original), format_bytes(row.compressed), format_rate(row.rate)]
    if row.paper_compressed is not None:
        diff = (row.compressed - row.paper_compressed) / row.paper_compressed
        cells += [format_bytes(row.paper_compressed), f"{diff:+.0%}"]
    return cells


def render(table: list[Row], fmt: str = "text", extra: dict | None = None) -> str:
    """The table as text (aligned columns), Markdown, or JSON (`extra` adds top-level JSON keys)."""
    paper = any(r.paper_compressed is not None for r in table)
    head = ["Layer", "p", "b", "Original", "Compressed", "Rate"] + (["Paper", "vs paper"] if paper else [])
    if fmt == "json":
        doc = {**(extra or {}), "units": "bytes",
               "layers": [{**asdict(r), "rate": r.rate} for r in table]}
        return json.dumps(doc, indent=2)
    body = [_cells(r) for r in table]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"**{c}**" if r[0] == "Overall" and c else c for c in r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head)] + [line(r) for r in body])
