"""One layer's search as a log: `<out>/search/<layer>.jsonl`, a header (layer, model, settings, data) and one
JSON line per finished evaluation, appended and flushed as it finishes, so a rerun resumes from it and Ctrl-C
or a crash loses at most the evaluation in progress. A worker holds its layer's log locked while it
searches it, so a worker that outlived a killed run can never log the same iteration as its successor.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO

from clipq.search.gp import Evaluation, SearchSettings, objective, round_bits, suggest_batch
from clipq.util.errors import ClipqError


SAFE_RE = re.compile(r"[A-Za-z0-9._-]")
MAX_STEM = 120


def file_stem(layer: str) -> str:
    """A layer's name as a file name (its search log, its plot), one name per layer: characters outside
    [A-Za-z0-9._-] as %XX (so 'a/b' and 'a__b' stay apart), a long name cut and told apart by its hash."""
    stem = "".join(c if SAFE_RE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in layer)
    if stem.startswith("."):
        stem = "%2E" + stem[1:]  # never a hidden file
    if len(stem) > MAX_STEM:
        stem = f"{stem[:MAX_STEM - 17]}~{hashlib.sha256(layer.encode()).hexdigest()[:16]}"
    return stem


def layer_log(out: Path, layer: str) -> Path:
    path = out / "search" / f"{file_stem(layer)}.jsonl"
    legacy = out / "search" / f"{layer.replace('/', '__')}.jsonl"  # clipq before 2026-12: '/' as '__'
    if not path.exists() and legacy != path and legacy.exists() and _legacy_header(legacy).get("layer") == layer:
        legacy.rename(path)
    return path


def _legacy_header(path: Path) -> dict:
    try:
        head = json.loads(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return {}
    return head if isinstance(head, dict) else {}


def _log_lines(path: Path) -> list[dict]:
    """A log's JSON lines: its header, then one per evaluation (none if there is no log)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_log(path: Path, layer: str, settings: SearchSettings, model_id: str, data: str = "") -> list[Evaluation]:
    """Evaluations logged so far (none if no log); refuse a log made with other settings, weights or data."""
    lines = _log_lines(path)
    if not lines:
        return []
    head = lines[0]
    logged = {"metric": "error", **{k: v for k, v in head.get("settings", {}).items() if k != "iterations"}}
    mine = {k: v for k, v in asdict(settings).items() if k != "iterations"}
    if logged != mine or head.get("layer") != layer or head.get("model") != model_id \
            or head.get("data", "") != data:
        raise ClipqError(f"{path}: this search log was made with other settings, another model or other data "
                         f"({head.get('settings')}, model {head.get('model')}, data {head.get('data')}); "
                         "use another --out, or delete it")
    return [Evaluation(**entry) for entry in lines[1:]]


def append_log(log: IO[str], entry: dict) -> None:
    """One JSON line, flushed to disk before returning."""
    log.write(json.dumps(entry) + "\n")
    log.flush()
    os.fsync(log.fileno())


def lock_log(log: IO[str], path: Path) -> None:
    """Hold the log's flock until it is closed, first waiting for a worker of an earlier run to stop."""
    try:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"[search] {path}: waiting for a search process of an earlier run to stop", file=sys.stderr)
        fcntl.flock(log, fcntl.LOCK_EX)


class LayerSearch:
    """One layer's search as a log: holds `<out>/search/<layer>.jsonl` locked, knows the evaluations so far,
    suggests the next points and appends each result exactly once. Executors (local processes, Ray) drive it."""

    def __init__(self, layer: str, layer_index: int, settings: SearchSettings, out: Path, model_id: str,
                 data: str = ""):
        self.layer, self.layer_index, self.settings = layer, layer_index, settings
        path = layer_log(out, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(path, "a")
        try:
            lock_log(self.log, path)
            self.history = read_log(path, layer, settings, model_id, data)  # under the lock: nobody appends now
            if os.fstat(self.log.fileno()).st_size == 0:
                append_log(self.log, {"layer": layer, "model": model_id, "settings": asdict(settings), "data": data})
        except BaseException:
            self.log.close()
            raise

    @property
    def done(self) -> bool:
        return len(self.history) >= self.settings.iterations

    def suggest(self, size: int = 1) -> list[tuple[float, float]]:
        """The next points (p, b_raw), at most `size` (see `suggest_batch`)."""
        return suggest_batch(self.history, self.settings, self.layer_index, size)

    def record(self, p: float, b_raw: float, error: float, benefit: float, seconds: float) -> Evaluation:
        """Log one finished evaluation (the next iteration) and add it to the history."""
        entry = Evaluation(len(self.history), p, b_raw, round_bits(b_raw), error, benefit,
                           objective(error, benefit, self.settings.lam), seconds)
        append_log(self.log, asdict(entry))
        self.history.append(entry)
        return entry

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> LayerSearch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_histories(out: Path, layers: list[str]) -> dict[str, list[Evaluation]]:
    """The logged evaluations of finished layer searches under `out` (logs checked when they were made)."""
    return {name: [Evaluation(**entry) for entry in _log_lines(layer_log(Path(out), name))[1:]] for name in layers}
