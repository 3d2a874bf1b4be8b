"""Run `caffe train` (the real Caffe CLI) resumably, with a progress bar and a log file.

Resuming: the newest `<snapshot_prefix>_iter_N.solverstate` is passed as `--snapshot`, so a
killed or Ctrl-C'd run continues where its last snapshot left off (Caffe snapshots on SIGINT).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from clipq.atomic import atomic_write
from clipq.errors import ClipqError

ITERATION_RE = re.compile(r"Iteration (\d+)")


def caffe_binary() -> Path:
    """The `caffe` wrapper installed next to this Python (`.venv/bin/caffe`, made by `make install`)."""
    path = Path(sys.prefix) / "bin" / "caffe"
    if not path.exists():
        found = shutil.which("caffe")
        if not found:
            raise ClipqError(f"{path}: no caffe wrapper; run `make install`")
        path = Path(found)
    return path


def read_solver(solver: Path):
    """Parse a solver prototxt; its `net`, `snapshot_prefix` and `max_iter` drive the run."""
    from clipq.caffe_io import read_text_proto

    param = read_text_proto(solver, "SolverParameter", "solver prototxt")
    if not param.snapshot_prefix:
        raise ClipqError(f"{solver}: field snapshot_prefix is required (clipq resumes from snapshots)")
    if param.max_iter <= 0:
        raise ClipqError(f"{solver}: field max_iter must be positive")
    return param


def latest_snapshot(prefix: str) -> tuple[int, Path] | None:
    """(iteration, path) of the newest solverstate written under `prefix`, if any."""
    prefix_path = Path(prefix)
    pattern = re.compile(re.escape(prefix_path.name) + r"_iter_(\d+)\.solverstate(\.h5)?")
    best = None
    for path in prefix_path.parent.glob(prefix_path.name + "_iter_*.solverstate*"):
        m = pattern.fullmatch(path.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return best


def final_weights(param) -> Path:
    """The caffemodel Caffe writes when training reaches max_iter."""
    return Path(f"{param.snapshot_prefix}_iter_{param.max_iter}.caffemodel")


def train(solver: Path, output: Path | None = None, weights: Path | None = None,
          log: Path | None = None, progress: bool = True) -> Path:
    """Train with `caffe train --solver`, resuming from the newest snapshot; copy the result to `output`.

    Paths inside the solver are resolved by Caffe relative to the current directory.
    Returns the final caffemodel (`output` when given).
    """
    param = read_solver(solver)
    final = final_weights(param)
    Path(param.snapshot_prefix).parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        _run_caffe(solver, param, weights, log or Path(f"{param.snapshot_prefix}.log"), progress)
    if output is None:
        return final
    with atomic_write(output, "wb") as f:
        f.write(final.read_bytes())
    return Path(output)


def _run_caffe(solver: Path, param, weights: Path | None, log: Path, progress: bool) -> None:
    cmd = [str(caffe_binary()), "train", "--solver", str(solver)]
    resume = latest_snapshot(param.snapshot_prefix)
    start = 0
    if resume:
        start = resume[0]
        cmd += ["--snapshot", str(resume[1])]
        print(f"clipq train: resuming {solver} from {resume[1]}", file=sys.stderr)
    elif weights:
        if not Path(weights).is_file():
            raise ClipqError(f"{weights}: weights file not found")
        cmd += ["--weights", str(weights)]
    bar = _progress_bar(param.max_iter, start, str(solver), progress)
    tail: deque[str] = deque(maxlen=25)
    with open(log, "a") as log_file:
        env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")  # the log is the progress source
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line)
                m = ITERATION_RE.search(line)
                if m and bar is not None:
                    bar.update(max(0, int(m.group(1)) - bar.n))
            code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # Caffe snapshots, then stops
            proc.wait()
            raise ClipqError(f"interrupted; Caffe snapshotted under {param.snapshot_prefix}; "
                             "rerun the same command to resume") from None
        finally:
            if bar is not None:
                bar.close()
    if code != 0:
        raise ClipqError(f"caffe train --solver {solver} failed (exit {code}); log: {log}\n" + "".join(tail))
    if not final_weights(param).exists():
        raise ClipqError(f"caffe train stopped before max_iter={param.max_iter}; rerun to resume (log: {log})")


def _progress_bar(total: int, start: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)
