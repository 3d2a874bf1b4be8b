"""Per-layer pruning-quantization settings: the (p, b) plan and its file.

A plan file (YAML or JSON) names layers and their pruning rate `p` and bit width `b` (`bits`):

    version: 1
    layers:
      conv1: {p: 0.21, b: 8}
      fc6:   {p: 0.96, b: 3}

Layers not listed stay plain Caffe layers. How a plan reaches a Caffe layer (its `param_str`) is
`caffe.param_str`'s business. Pure Python: no Caffe import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipq.quant.partition import MAX_BITS
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """Pruning rate p in [0, 1) and bit width bits in 1..8 for one layer."""

    p: float
    bits: int

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 <= self.p < 1:
            raise ValueError(f"p must be a number in [0, 1), got {self.p!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"b (bits) must be an integer in 1..{MAX_BITS}, got {self.bits!r}")


def _layer_plan(name: str, entry, source: str) -> LayerPlan:
    if not isinstance(entry, dict):
        raise ClipqError(f"{source}: layer '{name}': expected a mapping like {{p: 0.5, b: 4}}, got {entry!r}")
    unknown = set(entry) - {"p", "b", "bits"}
    if unknown:
        raise ClipqError(f"{source}: layer '{name}': unknown field(s) {sorted(unknown)}; expected p and b")
    if ("b" in entry) == ("bits" in entry) or "p" not in entry:
        raise ClipqError(f"{source}: layer '{name}': needs p and exactly one of b / bits")
    try:
        return LayerPlan(entry["p"], entry.get("b", entry.get("bits")))
    except ValueError as e:
        raise ClipqError(f"{source}: layer '{name}': {e}") from None


def parse_plan(data, source: str = "plan") -> dict[str, LayerPlan]:
    """Validate a decoded plan document ({version, layers: {name: {p, b}}}) into {layer name: LayerPlan}."""
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise ClipqError(f"{source}: expected a mapping with a 'layers' mapping (see `clipq convert --help`)")
    version = data.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise ClipqError(f"{source}: plan version {version} is not supported (this clipq reads version {PLAN_VERSION})")
    return {str(name): _layer_plan(str(name), entry, source) for name, entry in data["layers"].items()}


MAX_PLAN_BYTES = 4 << 20  # a plan of ten thousand layers is ~0.3 MB
MAX_PLAN_DEPTH = 8        # a plan is 4 levels deep: document, layers, layer, field


class PlanLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where a plan never needs more: no aliases (a few hundred bytes of nested
    aliases expand to gigabytes), no duplicate keys (the last would silently win), bounded nesting."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in a plan",
                                       problem_mark=self.peek_event().start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_PLAN_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested more than {MAX_PLAN_DEPTH} levels deep",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        duplicate = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if duplicate is not None:
            raise yaml.MarkedYAMLError(problem=f"key {duplicate!r} appears twice",
                                       problem_mark=node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_error(e: yaml.YAMLError) -> str:
    """One line: the problem and where (YAML's own messages span several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def load_plan(path: str | Path) -> dict[str, LayerPlan]:
    """Read a YAML or JSON plan file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise ClipqError(f"{path}: cannot read plan ({e.strerror})") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise ClipqError(f"{path}: larger than {MAX_PLAN_BYTES >> 20} MB, not a plan")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=PlanLoader)  # JSON is YAML too
    except UnicodeDecodeError:
        raise ClipqError(f"{path}: not a text file (a plan is YAML or JSON)") from None
    except yaml.YAMLError as e:
        raise ClipqError(f"{path}: not a valid plan: {_yaml_error(e)}") from None
    except RecursionError:
        raise ClipqError(f"{path}: not a valid plan: nested too deeply") from None
    return parse_plan(data, str(path))


def rounded_rate(p: float, digits: int = 4) -> float:
    """A pruning rate rounded to `digits` decimals (for plan files, reports and plan keys), except one that
    would round up to 1, which is no pruning rate: that one is kept as it is."""
    rounded = round(float(p), digits)
    return rounded if rounded < 1 else float(p)


def save_plan(plan: dict[str, LayerPlan], path: str | Path, extra: dict | None = None) -> None:
    """Write a plan (YAML, or JSON when the name ends in .json) atomically; `extra` adds top-level keys."""
    doc = {"version": PLAN_VERSION, **(extra or {}),
           "layers": {name: {"p": rounded_rate(lp.p), "b": int(lp.bits)} for name, lp in plan.items()}}
    with atomic_write(path) as f:
        if str(path).endswith(".json"):
            json.dump(doc, f, indent=2)
        else:
            yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=None)
