"""Bayesian search of each layer's (p, b) (CLIP-Q section 3.2): GP + expected improvement via GPyOpt.

For each layer i, minimise  eps(theta) - lambda * c_i(theta)  over theta = (p, b), where eps is the top-1
error in percent on a training subset with layer i pruned-quantized and c_i the layer's share of the
net's bits saved by compressing it (`subset_eval`). Error in percent is what makes the paper's lambda
(40 AlexNet, 5 GoogLeNet, 10 ResNet-50) give its tables: with error as a fraction, any lambda of that
size would favour maximal compression everywhere.

Domain: p in [0, p_max] (continuous); b continuous in [0.5, 8.5] and rounded to the nearest integer
(so every bit width 1..8 owns an equal share of the axis), the "b before rounding" of the paper's
Fig. 3. The first `initial` points of a layer are drawn at random, the rest are GPyOpt's EI
suggestions from all points so far. Layers are independent: they run in parallel processes, or on Ray
actors (`ray_executor`), both driving the same `LayerSearch`.

Every evaluation is appended (and flushed) to `<out>/search/<layer>.jsonl` when it finishes; running the
same command again resumes from those logs, so Ctrl-C or a crash loses at most the evaluation in
progress. A worker holds its layer's log locked while it searches it, so a worker that outlived a killed
run can never log the same iteration as its successor; workers die with the run (`processes`). The best
point of each layer becomes the plan (`plan.yaml`); `plots/<layer>.png` shows the search like Fig. 3.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Callable

import numpy as np

from clipq.atomic import atomic_write
from clipq.errors import ClipqError
from clipq.lock import output_directory
from clipq.plan import LayerPlan, save_plan
from clipq.processes import end_with_parent
from clipq.prune_quant import MAX_BITS

B_DOMAIN = (0.5, MAX_BITS + 0.5)


@dataclass(frozen=True)
class SearchSettings:
    """What changes the search's result (a resumed log must have been made with the same)."""

    lam: float = 10.0
    iterations: int = 50
    initial: int = 5
    subset: int = 5000
    seed: int = 0
    p_max: float = 0.99


@dataclass(frozen=True)
class Evaluation:
    iteration: int
    p: float
    b_raw: float   # GPyOpt's continuous b, before rounding
    bits: int
    error: float   # top-1 error on the subset, percent
    benefit: float  # c_i
    objective: float
    seconds: float


def objective(error: float, benefit: float, lam: float) -> float:
    """Eq. 1 of the paper: eps(theta) - lambda * c_i(theta)."""
    return error - lam * benefit


def round_bits(b_raw: float) -> int:
    """Nearest bit width in 1..8 (half up)."""
    return int(min(max(math.floor(b_raw + 0.5), 1), MAX_BITS))


def _rng(settings: SearchSettings, layer_index: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, layer_index, iteration])


def suggest_batch(history: list[Evaluation], settings: SearchSettings, layer_index: int,
                  size: int) -> list[tuple[float, float]]:
    """The next `size` (p, b_raw) to evaluate (fewer if the initial design or the layer's iterations end
    sooner): random for the initial design, then GP-EI; a batch of several uses GPyOpt's local penalization.
    Size 1 gives the same points as evaluating one at a time."""
    iteration = len(history)
    size = max(1, min(size, settings.iterations - iteration))
    if iteration < settings.initial:  # each initial point has its own generator: batching keeps the same points
        return [_random_point(settings, _rng(settings, layer_index, i))
                for i in range(iteration, min(iteration + size, settings.initial))]
    rng = _rng(settings, layer_index, iteration)
    os.environ.setdefault("MPLBACKEND", "Agg")  # GPyOpt imports pylab
    import GPyOpt
    from threadpoolctl import threadpool_limits

    domain = [{"name": "p", "type": "continuous", "domain": (0.0, settings.p_max)},
              {"name": "b", "type": "continuous", "domain": B_DOMAIN}]
    X = np.array([[e.p, e.b_raw] for e in history])
    Y = np.array([[e.objective] for e in history])
    batch = {} if size == 1 else {"evaluator_type": "local_penalization", "batch_size": size}
    if batch:
        _patch_gpyopt_local_penalization()
    np.random.seed(int(rng.integers(2 ** 31)))  # GPyOpt draws from numpy's global generator
    with threadpool_limits(1):  # tiny matrices: threads cost more than they save (measured 5x slower)
        bo = GPyOpt.methods.BayesianOptimization(f=None, domain=domain, X=X, Y=Y, acquisition_type="EI",
                                                 normalize_Y=True, exact_feval=False, optimize_restarts=1,
                                                 verbosity=False, **batch)
        points = bo.suggest_next_locations()
    return [(float(np.clip(p, 0.0, settings.p_max)), float(np.clip(b_raw, *B_DOMAIN))) for p, b_raw in points]


def _random_point(settings: SearchSettings, rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(0, settings.p_max)), float(rng.uniform(*B_DOMAIN))


def _patch_gpyopt_local_penalization() -> None:
    """GPyOpt 1.2.6's batch mode with current scipy (1.17): `estimate_L` reads `res.fun[0][0]`, but L-BFGS-B's
    `res.fun` is now a plain float (TypeError). Replace it by the same estimate with that one expression
    made tolerant (`np.atleast_2d(res.fun)[0][0]`); site-packages stay untouched."""
    import scipy.optimize
    from GPyOpt.core.evaluators import batch_local_penalization as lp

    if getattr(lp.estimate_L, "clipq_patched", False):
        return

    def estimate_L(model, bounds, storehistory=True):
        def df(x, model, x0):
            dmdx, _ = model.predictive_gradients(np.atleast_2d(x))
            return -np.sqrt((dmdx * dmdx).sum(1))  # minus the norm of the mean's gradient

        samples = np.vstack([lp.samples_multidimensional_uniform(bounds, 500), model.X])
        x0 = samples[np.argmin(df(samples, model, 0))]
        res = scipy.optimize.minimize(df, x0, method="L-BFGS-B", bounds=bounds, args=(model, x0),
                                      options={"maxiter": 200})
        L = -np.atleast_2d(res.fun)[0][0]
        return 10 if L < 1e-7 else L  # as GPyOpt: a flat model

    estimate_L.clipq_patched = True
    lp.estimate_L = estimate_L


def layer_log(out: Path, layer: str) -> Path:
    return out / "search" / (layer.replace("/", "__") + ".jsonl")


def _log_lines(path: Path) -> list[dict]:
    """A log's JSON lines: its header, then one per evaluation (none if there is no log)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_log(path: Path, layer: str, settings: SearchSettings, model_id: str, data: str = "") -> list[Evaluation]:
    """Evaluations logged so far (none if no log); refuse a log made with other settings, weights or data."""
    lines = _log_lines(path)
    if not lines:
        return []
    head = lines[0]
    logged = {k: v for k, v in head.get("settings", {}).items() if k != "iterations"}
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


def search_layer(layer: str, layer_index: int, evaluate: Callable[[str, float, int], tuple[float, float]],
                 settings: SearchSettings, out: Path, model_id: str, data: str = "") -> list[Evaluation]:
    """Run (or resume) one layer's search to `settings.iterations` evaluations, one at a time; `data` names
    the images the error is measured on (recorded in the log's header)."""
    with LayerSearch(layer, layer_index, settings, out, model_id, data) as search:
        while not search.done:
            start = time.perf_counter()
            (p, b_raw), = search.suggest()
            error, benefit = evaluate(layer, p, round_bits(b_raw))
            search.record(p, b_raw, error, benefit, time.perf_counter() - start)
        return search.history


def best(history: list[Evaluation]) -> Evaluation:
    """The evaluation with the lowest objective (the earliest among equals)."""
    return min(history, key=lambda e: (e.objective, e.iteration))


def plot_layer(layer: str, history: list[Evaluation], path: Path, lam: float) -> None:
    """Fig. 3 of the paper for one layer: p, b before rounding and the objective per iteration, the
    chosen evaluation marked."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    it = [e.iteration + 1 for e in history]
    chosen = best(history)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = [([e.p for e in history], "pruning rate p", (0, 1), chosen.p),
              ([e.b_raw for e in history], "b before rounding", B_DOMAIN, chosen.b_raw),
              ([e.objective for e in history], f"error % - {lam:g} x c", None, chosen.objective)]
    for ax, (values, label, ylim, mark) in zip(axes, panels):
        ax.plot(it, values, ".-", color="tab:blue", lw=0.8, label="evaluated")
        ax.plot([chosen.iteration + 1], [mark], "*", color="tab:red", ms=12, label="chosen")
        ax.set(xlabel="iteration", ylabel=label, ylim=ylim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].plot(it, np.minimum.accumulate([e.objective for e in history]), "-", color="tab:orange",
                 label="best so far")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{layer}: chosen p = {chosen.p:.3f}, b = {chosen.bits} (iteration {chosen.iteration + 1}; "
                 f"error {chosen.error:.2f} %, c = {chosen.benefit:.4f})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# --- running the search on a Caffe model ---------------------------------------------------------

@dataclass(frozen=True)
class SearchJob:
    eval_prototxt: str
    weights: str
    accuracy_blob: str
    out: str
    settings: SearchSettings
    model_id: str
    data: str  # the LMDB the subset is drawn from
    all_layers: tuple[str, ...]  # every compressible layer of the net, in order

    def make_evaluator(self):
        """The job's SubsetEvaluator: (layer, p, bits) -> (error %, benefit), built once per worker."""
        from clipq.subset_eval import SubsetEvaluator

        return SubsetEvaluator(self.eval_prototxt, self.weights, self.accuracy_blob, self.settings.subset)


def _worker(job: SearchJob, layers: list[tuple[int, str]], parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    end_with_parent(signal.SIGTERM, parent)

    evaluate = job.make_evaluator()
    for index, layer in layers:
        search_layer(layer, index, evaluate, job.settings, Path(job.out), job.model_id, job.data)


def model_id(weights: str | os.PathLike) -> str:
    """Identifies the weights a log belongs to: name, size, and a hash of the first and last MB."""
    path = Path(weights)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(path.stat().st_size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return f"{path.name}:{path.stat().st_size}:{digest.hexdigest()[:16]}"


def run(model, weights, out, layers: list[str] | None = None, settings: SearchSettings = SearchSettings(),
        jobs: int = 1, data: str | None = None, progress: bool = True,
        log: Callable[[str], None] = lambda message: print(message, file=sys.stderr), ray: str | None = None,
        batch: int | None = None) -> dict[str, LayerPlan]:
    """`clipq search`: search every (or the given) Convolution / InnerProduct layer; write plan.yaml and
    the plots under `out`; return the plan.

    `jobs` local processes evaluate, or, with `ray` (an address or 'local'), `jobs` Ray actors
    (`ray_executor`; `batch` points per layer at a time, default workers // unfinished layers).

    The error is measured on a random subset of `data` (an LMDB: held-out validation images), or of the
    net's TRAIN-phase LMDB when `data` is None (the paper's choice). A subset larger than the LMDB is
    capped to it (with a message).
    """
    with output_directory(out, log):
        job, layers = prepare(model, weights, out, layers, settings, data, log)
        indexed = [(job_layer_index(job, name), name) for name in layers]
        if ray:
            from clipq import ray_executor

            ray_executor.run(job, indexed, ray, jobs, batch, progress)
        else:
            _run_workers(job, indexed, jobs, progress)
        histories = load_histories(job, layers)
        plan = {name: LayerPlan(best(h).p, best(h).bits) for name, h in histories.items()}
        for name, history in histories.items():
            plot_layer(name, history, Path(out) / "plots" / (name.replace("/", "__") + ".png"), job.settings.lam)
        save_plan(plan, Path(out) / "plan.yaml", extra={"lambda": job.settings.lam, "data": job.data, "searched": {
            name: {"objective": round(best(h).objective, 4), "error": round(best(h).error, 3),
                   "benefit": round(best(h).benefit, 6)} for name, h in histories.items()}})
    return plan


def capped_settings(settings: SearchSettings, entries: int, source: str,
                    log: Callable[[str], None]) -> SearchSettings:
    """The settings with the subset capped to the LMDB's `entries` (a multiple of the eval batch)."""
    from clipq import subset_eval

    if settings.subset <= entries:
        return settings
    capped = entries if entries <= subset_eval.EVAL_BATCH else entries - entries % subset_eval.EVAL_BATCH
    log(f"[search] {source} has {entries} images, fewer than --subset {settings.subset}: using {capped}")
    return replace(settings, subset=capped)


def prepare(model, weights, out, layers: list[str] | None, settings: SearchSettings, data: str | None,
            log: Callable[[str], None]) -> tuple[SearchJob, list[str]]:
    """Check the layers, write the subset LMDB and the search net; the job every worker runs."""
    from clipq import caffe_io, subset_eval
    from clipq.convert import compressible_layers

    out = Path(out)
    net = caffe_io.read_net_param(model)
    names = compressible_layers(net)
    layers = layers or names
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ClipqError(f"{model}: no Convolution/InnerProduct layer(s) {', '.join(unknown)}; "
                         f"compressible layers: {', '.join(names)}")
    if settings.subset <= 0 or settings.subset % subset_eval.eval_batch(settings.subset):
        raise ClipqError(f"--subset must be at most {subset_eval.EVAL_BATCH} or a multiple of it, "
                         f"got {settings.subset}")
    source = str(Path(data or subset_eval.training_source(net, str(model))).resolve())
    settings = capped_settings(settings, caffe_io.lmdb_entries(source, "search's LMDB"), source, log)
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    subset = out / f"subset_{tag}_{settings.subset}_seed{settings.seed}_lmdb"
    if not subset.exists():
        subset_eval.write_subset(source, settings.subset, settings.seed, subset)
    eval_net, accuracy_blob = subset_eval.eval_net_param(net, subset.resolve(), settings.subset, str(model))
    eval_prototxt = out / "search_net.prototxt"
    with atomic_write(eval_prototxt) as f:
        f.write(str(eval_net))
    job = SearchJob(str(eval_prototxt), str(weights), accuracy_blob, str(out), settings, model_id(weights), source,
                    tuple(names))
    return job, layers


def job_layer_index(job: SearchJob, name: str) -> int:
    """A layer's position in the net: seeds its search, so a layer searched alone gets the same points."""
    return job.all_layers.index(name)


def read_histories(out: Path, layers: list[str]) -> dict[str, list[Evaluation]]:
    """The logged evaluations of finished layer searches under `out` (logs checked when they were made)."""
    return {name: [Evaluation(**entry) for entry in _log_lines(layer_log(Path(out), name))[1:]] for name in layers}


def load_histories(job: SearchJob, layers: list[str]) -> dict[str, list[Evaluation]]:
    """Every layer's logged evaluations (checked against the job's settings, weights and data)."""
    return {name: read_log(layer_log(Path(job.out), name), name, job.settings, job.model_id, job.data)
            for name in layers}


def _logged(job: SearchJob, layers: list[tuple[int, str]]) -> int:
    total = 0
    for _, name in layers:
        path = layer_log(Path(job.out), name)
        if path.exists():
            total += max(sum(1 for line in path.read_text().splitlines() if line.strip()) - 1, 0)
    return min(total, len(layers) * job.settings.iterations)


def _run_workers(job: SearchJob, layers: list[tuple[int, str]], jobs: int, progress: bool) -> None:
    """Layers split round robin over `jobs` processes; a progress bar counts the logged evaluations."""
    from tqdm import tqdm

    groups = [layers[i::jobs] for i in range(max(1, min(jobs, len(layers))))]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(job, group, os.getpid())) for group in groups]
    bar = tqdm(total=len(layers) * job.settings.iterations, initial=_logged(job, layers), unit="eval",
               desc=f"search ({len(layers)} layers, {len(groups)} jobs)", disable=not progress)
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            time.sleep(0.5)
            bar.update(_logged(job, layers) - bar.n)
    except KeyboardInterrupt:
        raise ClipqError("interrupted; every finished evaluation is logged: rerun the same command to resume") \
            from None
    finally:
        _end(procs)
        bar.update(_logged(job, layers) - bar.n)
        bar.close()
    failed = [proc.exitcode for proc in procs if proc.exitcode]
    if failed:
        raise ClipqError(f"a search process failed (exit code {failed[0]}); see its error above. "
                         "Finished evaluations are logged: fix the cause and rerun to resume")


def _end(procs: list[multiprocessing.Process], grace: float = 10.0) -> None:
    """Terminate the workers still running and reap them all (killed if they ignore SIGTERM)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(grace)
            if proc.is_alive():
                proc.kill()
                proc.join()
