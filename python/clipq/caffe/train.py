"""Run `caffe train` (the real Caffe CLI) resumably, with a progress bar and a log file.

Resuming: the newest `<snapshot_prefix>_iter_N.solverstate` is passed as `--snapshot`, so a
killed or Ctrl-C'd run continues where its last snapshot left off (Caffe snapshots on SIGINT; clipq
sends it SIGINT when it is interrupted or dies). A kill while Caffe writes a snapshot leaves it
truncated, so snapshots are checked before they are trusted: a solverstate must parse and end with
its last field, and its caffemodel (like the final one) must parse and hold every layer of the TRAIN
net. A bad one is skipped, with a message, for the previous snapshot (or the initial weights).
While it runs, `<snapshot_prefix>.lock` keeps a second run off the same snapshots.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from functools import partial
from pathlib import Path

from google.protobuf.message import DecodeError
from tqdm import tqdm

from clipq.caffe import build, caffe_io, caffemodel
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError, Interrupted
from clipq.util.lock import held_fds, locked
from clipq.util.processes import end_with_parent

ITERATION_RE = re.compile(r"Iteration (\d+)")
SNAPSHOT_SECONDS = 300  # how long an interrupted Caffe may take to write its snapshot before it is killed


def read_solver(solver: Path):
    """Parse a solver prototxt; its `net`, `snapshot_prefix` and `max_iter` drive the run."""
    param = caffe_io.read_text_proto(solver, "SolverParameter", "solver prototxt")
    if not param.snapshot_prefix:
        raise ClipqError(f"{solver}: field snapshot_prefix is required (clipq resumes from snapshots)")
    if param.max_iter <= 0:
        raise ClipqError(f"{solver}: field max_iter must be positive")
    solver_net(solver, param)
    return param


def solver_net(solver: Path, param) -> Path | None:
    """The net file the solver trains (None for an inline net), where Caffe looks for it: relative to the
    current directory, not to the solver; an error that says so when it is not there."""
    name = param.train_net or param.net
    if not name or param.HasField("train_net_param") or param.HasField("net_param"):
        return None
    path = Path(name)
    if path.is_file():
        return path
    beside = Path(solver).parent / name
    hint = (f"; it is at {beside}: run from {Path(solver).parent.resolve()}, or give the path from here"
            if not path.is_absolute() and beside.is_file() else "")
    raise ClipqError(f"{solver}: net {name!r} not found (Caffe reads it relative to the current directory, "
                     f"{Path.cwd()}){hint}")


def snapshots(prefix: str) -> list[tuple[int, Path]]:
    """(iteration, path) of the solverstates written under `prefix`, newest first."""
    prefix_path = Path(prefix)
    pattern = re.compile(re.escape(prefix_path.name) + r"_iter_(\d+)\.solverstate(\.h5)?")
    found = []
    for path in prefix_path.parent.glob(prefix_path.name + "_iter_*.solverstate*"):
        m = pattern.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def train_layers(param) -> set[str]:
    """Names of the layers every snapshot of the solver's net holds: its TRAIN-phase layers (a layer
    with stage or level rules is left out: whether Caffe built it is not decided here)."""
    pb2 = caffe_io.caffe_pb2()
    if param.HasField("train_net_param") or param.HasField("net_param"):
        net = param.train_net_param if param.HasField("train_net_param") else param.net_param
    else:
        net = caffe_io.read_net_param(param.train_net or param.net)

    def matches(rule) -> bool:
        return not rule.HasField("phase") or rule.phase == pb2.TRAIN

    names = set()
    for layer in net.layer:
        rules = [*layer.include, *layer.exclude]
        if any(r.stage or r.not_stage or r.HasField("min_level") or r.HasField("max_level") for r in rules):
            continue
        if any(map(matches, layer.include)) if layer.include else not any(map(matches, layer.exclude)):
            names.add(layer.name)
    return names


def caffemodel_problem(path: Path, layers: set[str]) -> str | None:
    """Why the caffemodel `path` is not a whole snapshot of a net with `layers` (None if it is)."""
    try:
        found = {layer.name for layer in caffemodel.read(path)}
    except ClipqError as e:
        return str(e)
    missing = sorted(layers - found)
    if missing and not layers & found:
        return f"{path}: holds none of this net's layers (another net's snapshot?)"
    if missing:
        return f"{path}: no layer {', '.join(missing)} (truncated, or a snapshot of another net)"
    return None


def solverstate_problem(path: Path, layers: set[str]) -> str | None:
    """Why the solverstate `path` cannot be resumed from (None if it can). HDF5 snapshots are trusted."""
    if path.suffix == ".h5":
        return None
    state = caffe_io.caffe_pb2().SolverState()
    try:
        state.ParseFromString(path.read_bytes())
    except (DecodeError, OSError) as e:
        return f"{path}: not a valid solverstate ({e})"
    if not state.HasField("current_step"):  # Caffe always writes it, after the history
        return f"{path}: truncated (no current_step)"
    return caffemodel_problem(Path(state.learned_net), layers)


def resume_point(param, layers: set[str]) -> tuple[int, Path] | None:
    """The newest snapshot that can be resumed from; each one skipped is reported."""
    found = snapshots(param.snapshot_prefix)
    for iteration, path in found:
        problem = (f"its iteration {iteration} is past the solver's max_iter {param.max_iter}"
                   if iteration > param.max_iter else solverstate_problem(path, layers))
        if problem is None:
            return iteration, path
        print(f"clipq train: not resuming from {path.name}: {problem}", file=sys.stderr)
    if found:
        print(f"clipq train: no usable snapshot under {param.snapshot_prefix}: starting from the initial weights",
              file=sys.stderr)
    return None


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
    with locked(f"{param.snapshot_prefix}.lock"):
        layers = train_layers(param)
        if not finished(final, layers):
            _run_caffe(solver, param, weights, log or Path(f"{param.snapshot_prefix}.log"), progress, layers)
        if output is None:
            return final
        copy_result(final, output)
    return Path(output)


def copy_result(final: Path, output: Path) -> None:
    """The final caffemodel copied to `output`, atomically."""
    with atomic_write(output, "wb") as f:
        f.write(final.read_bytes())


def require_weights(weights: Path) -> None:
    """--weights must be a file (checked before Caffe, which would abort)."""
    if not Path(weights).is_file():
        raise ClipqError(f"{weights}: weights file not found")


def final_problem(param, layers: set[str]) -> str | None:
    """Why training did not produce a whole final caffemodel (None if it did)."""
    final = final_weights(param)
    return caffemodel_problem(final, layers) if final.exists() else f"no {final.name}"


def finished(final: Path, layers: set[str]) -> bool:
    """Whether `final` is a whole caffemodel of the net (a truncated one is reported and not taken)."""
    problem = caffemodel_problem(final, layers) if final.exists() else None
    if problem:
        print(f"clipq train: not taking {final.name} as the result: {problem}", file=sys.stderr)
    return final.exists() and problem is None


def _run_caffe(solver: Path, param, weights: Path | None, log: Path, progress: bool, layers: set[str]) -> None:
    cmd = [str(build.caffe_binary()), "train", "--solver", str(solver)]
    resume = resume_point(param, layers)
    start = 0
    if resume:
        start = resume[0]
        cmd += ["--snapshot", str(resume[1])]
        print(f"clipq train: resuming {solver} from {resume[1]}", file=sys.stderr)
    elif weights:
        require_weights(weights)
        cmd += ["--weights", str(weights)]
    bar = progress_bar(param.max_iter, start, str(solver), progress)
    tail: deque[str] = deque(maxlen=25)
    with open(log, "a", buffering=1) as log_file:  # line by line: `tail -f` follows it
        env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")  # the log is the progress source
        # Its own session: Ctrl-C and a hangup reach clipq only, which relays them as SIGINT (snapshot,
        # stop). The locks stay held until Caffe exits, even if clipq is killed (it then gets SIGINT).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, pass_fds=held_fds(),
                                preexec_fn=partial(_caffe_child, os.getpid()))
        try:
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line)
                m = ITERATION_RE.search(line)
                if m and bar is not None:
                    bar.update(max(0, int(m.group(1)) - bar.n))
            code = proc.wait()
        except KeyboardInterrupt:
            _stop(proc, log_file)
            raise Interrupted(f"interrupted; Caffe snapshotted under {param.snapshot_prefix}; "
                             "rerun the same command to resume") from None
        finally:
            if bar is not None:
                bar.close()
    if code != 0:
        raise _failure(solver, code, log, list(tail), Path(param.snapshot_prefix).parent)
    problem = final_problem(param, layers)
    if problem:
        raise ClipqError(f"caffe train stopped before max_iter={param.max_iter} ({problem}); rerun to resume "
                         f"(log: {log})" + _full_disk(Path(param.snapshot_prefix).parent))


FATAL_RE = re.compile(r"^F\d{4,8} [\d:.]+ +\d+ ([^\]]+)\] (.*)$")  # glog's F line: Caffe's CHECK that failed
LOW_DISK = 64 << 20  # bytes free under which a failed write is put down to a full disk


def _failure(solver, code: int, log: Path, tail: list[str], snapshot_dir: Path) -> ClipqError:
    """One line from Caffe's fatal (glog F) line if it wrote one, saying so when the snapshots' disk is full;
    else the log's last lines."""
    fatal = next((m for m in map(FATAL_RE.match, reversed(tail)) if m), None)
    if fatal is None:
        return ClipqError(f"caffe train --solver {solver} failed (exit {code}); log: {log}\n" + "".join(tail))
    where, what = fatal.groups()
    return ClipqError(f"caffe train --solver {solver} failed: {what.strip()} ({where}); log: {log}"
                      + _full_disk(snapshot_dir))


def _full_disk(snapshot_dir: Path) -> str:
    """What to add to a failure when the snapshots' disk is (nearly) full."""
    try:
        free = shutil.disk_usage(snapshot_dir).free
    except OSError:
        return ""
    if free >= LOW_DISK:
        return ""
    return (f". {snapshot_dir} has {free / 1e6:.0f} MB free: a snapshot could not be written; free space and "
            "rerun to resume from the last complete snapshot")


def _caffe_child(parent: int) -> None:
    """Between fork and exec: SIGINT when clipq dies; and with clipq gone, Caffe's log lines are lost
    (SIGPIPE ignored), not its snapshot."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    end_with_parent(signal.SIGINT, parent)


def _stop(proc: subprocess.Popen, log_file) -> None:
    """Ask Caffe to snapshot and stop, and wait; kill it if it hangs or a second interrupt comes."""
    proc.send_signal(signal.SIGINT)
    watchdog = threading.Timer(SNAPSHOT_SECONDS, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:  # keep reading: Caffe blocks on a full pipe and would never snapshot
            log_file.write(line)
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
    finally:
        watchdog.cancel()


def progress_bar(total: int, start: int, desc: str, enabled: bool):
    """A tqdm bar of training iterations on stderr (None when disabled)."""
    if not enabled:
        return None
    return tqdm(total=total, initial=start, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)
