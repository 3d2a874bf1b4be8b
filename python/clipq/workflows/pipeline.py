"""`clipq compress`: the whole CLIP-Q pipeline on a Caffe model, stage by stage, resumable.

baseline evaluation -> search (p, b) -> convert to CLIP-Q layers -> fine-tune with `caffe train` ->
export -> encode (.clipq) -> decode -> evaluate the decoded plain caffemodel with plain Caffe -> ONNX (the
final .clipq as an ONNX file next to it, its top-1 in onnxruntime; `onnx_output`) -> report.

Every stage records in `<out>/stages.json` a hash of its inputs (files and settings) and how long it
took; a stage whose outputs exist and whose inputs did not change is skipped, so rerunning the command
continues where it stopped (the search and the fine-tuning also resume inside their stage).

With a validation LMDB (`val`) the search, the budget and the fine-tuning's monitor see only held-out
images; the train_val's TEST data gives the final numbers. With `max_drop`, the convert .. evaluate
stages run once per round under `<out>/rounds/NN/`, the rounds bisecting the search's Lagrangian path
(`search.budget`) until the smallest plan within the budget is found or the rounds are spent.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from clipq.caffe import caffe_io, caffemodel, convert, data_parallel, distill, preflight, train
from clipq.methods.base import Method
from clipq.methods.clipq import ClipQ
from clipq.plan import load_plan, rounded_rate, save_plan
from clipq.search import budget, driver, ray_executor, subset_eval
from clipq.search.gp import SearchSettings
from clipq.search.job import model_id
from clipq.search.log import read_histories
from clipq.storage import sparse_codec
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError
from clipq.util.lock import output_directory
from clipq.workflows import compressed_model, onnx_output
from clipq.workflows import report as reporting

SEARCH_ON = ("auto", "val", "train")


@dataclass(frozen=True)
class Aids:
    """What the fine-tuning may add to the paper's plain fine-tuning (all off here; the command line's defaults
    for a run with --max-drop are chosen by measurement, docs/pipeline.md)."""

    epochs: float | None = None  # fine-tuning length in epochs of the training LMDB (None: the solver's max_iter)
    ramp: float = 0.0            # share of the fine-tuning over which each layer's p ramps up (gradual pruning)
    distill: float = 0.0         # temperature of the distillation from the uncompressed net (0: none)
    distill_weight: float = 1.0  # the soft targets' loss weight (the labels' loss keeps its own)

    def check(self) -> None:
        if self.epochs is not None and not self.epochs > 0:
            raise ClipqError(f"--finetune-epochs must be positive, got {self.epochs}")
        if not 0 <= self.ramp < 1:
            raise ClipqError(f"--ramp must be a share of the fine-tuning in [0, 1), got {self.ramp}")
        if self.distill < 0 or not self.distill_weight > 0:
            raise ClipqError(f"--distill must be >= 0 and --distill-weight > 0, got {self.distill} and "
                             f"{self.distill_weight}")


@dataclass(frozen=True)
class CompressConfig:
    model: Path              # plain train_val prototxt (TRAIN/TEST LMDB Data layers, TEST Accuracy); in a
                             # ZooConfig, the deploy (the pipeline then runs with its train_val)
    weights: Path            # trained plain caffemodel
    solver: Path | None      # fine-tuning solver: its net and snapshot_prefix are replaced (zoo: None, no
                             # fine-tuning)
    out: Path
    plan: Path | None = None  # given (p, b): no search
    settings: SearchSettings = field(default_factory=SearchSettings)
    jobs: int = 1
    max_iter: int | None = None  # overrides the solver's
    huffman: bool = False
    progress: bool = True
    val: Path | None = None   # held-out validation LMDB: the search's error, the budget, fine-tuning's monitor
    search_on: str = "auto"   # "val" (the held-out LMDB), "train" (a training subset, the paper), auto: val if any
    max_drop: float | None = None  # top-1 points the decoded model may lose on val (None: one round at --lam)
    rounds: int = 6           # fine-tuning rounds of the budget's bisection
    se_margin: float = 1.0    # a round meets the budget when val drop + se_margin * its standard error <= max_drop
    synthetic: bool = False   # random images and labels (`reproduce --smoke`): the report says accuracy means nothing
    ray: str | None = None    # search on Ray: 'local' or a cluster's address (`ray_executor`); None: local processes
    ray_batch: int | None = None  # points per layer at a time on Ray (None: workers // unfinished layers)
    mpi: int = 0              # fine-tune in this many MPI processes (clipq.data_parallel); 0: one `caffe train`
    aids: Aids = field(default_factory=Aids)  # distillation, gradual pruning, length in epochs
    onnx: bool = True         # write the final model as ONNX next to its .clipq (--no-onnx: not)

    @property
    def search_data(self) -> str:
        """Where the search measures its error: 'val' or 'train'."""
        if self.search_on == "auto":
            return "val" if self.val is not None else "train"
        return self.search_on

    def check(self) -> None:
        """Refuse contradictory or missing settings before any stage runs."""
        if self.search_on not in SEARCH_ON:
            raise ClipqError(f"--search-on must be one of {', '.join(SEARCH_ON)}, got {self.search_on!r}")
        if self.search_data == "val" and self.val is None:
            raise ClipqError("--search-on val needs --val LMDB (held-out images the baseline was not trained on)")
        if self.max_drop is not None:
            if self.val is None:
                raise ClipqError("--max-drop needs --val LMDB: the budget is measured on held-out images")
            if self.plan is not None:
                raise ClipqError("--max-drop chooses the plan from the search; it cannot be combined with --plan")
            if not self.max_drop > 0:
                raise ClipqError(f"--max-drop must be a positive number of top-1 points, got {self.max_drop}")
            if self.rounds < 1:
                raise ClipqError(f"--rounds must be at least 1, got {self.rounds}")
            if self.se_margin < 0:
                raise ClipqError(f"--se-margin must be >= 0, got {self.se_margin}")
        for path, what in ((self.model, "--model"), (self.weights, "--weights"), (self.solver, "--solver"),
                           (self.plan, "--plan")):
            if path is not None and not Path(path).is_file():
                raise ClipqError(f"{path}: file not found ({what})")
        if self.val is not None:
            caffe_io.lmdb_entries(self.val, "validation LMDB (--val)")
        if self.mpi:
            data_parallel.require_support()
        self.check_inputs()

    def check_inputs(self) -> None:
        """What Caffe would abort on late: the net and its LMDBs, the weights, the plan against the net, the
        solver; so that no stage starts (and nothing is copied into `out`) with a bad input."""
        # require_all=False: a zoo model's weights may lack heads only training uses (GoogLeNet's auxiliary
        # classifiers); fine-tuning learns them, and an empty file or another net's weights are still refused
        net = preflight.check_net(self.model, self.weights, "TEST", require_all=False)
        preflight.blob_shapes(net.param, self.model, "TRAIN")  # the fine-tuning's (and the search's) LMDB
        if self.val is not None:
            preflight.blob_shapes(caffe_io.with_test_source(net.param, self.val, str(self.model)),
                                  f"{self.model} reading --val {self.val}", "TEST")
        if self.plan is not None:
            plan = load_plan(self.plan)
            convert.check_plan(net.param, plan, f"{self.plan} (--plan) for {self.model}")
            if not plan:
                raise ClipqError(f"{self.plan}: the plan names no layer to compress (--plan)")
        solver = caffe_io.read_text_proto(self.solver, "SolverParameter", "solver prototxt")
        if (solver.max_iter if self.max_iter is None else self.max_iter) <= 0:
            raise ClipqError(f"{self.solver}: max_iter must be positive (or give --max-iter)")
        self.aids.check()
        if self.aids.epochs is not None and self.max_iter is not None:
            raise ClipqError("give the fine-tuning's length once: --max-iter or --finetune-epochs")
        if self.ray and self.ray != ray_executor.LOCAL and self.plan is None:
            ray_executor.check_reachable(self.ray)


def file_id(path: Path) -> str:
    """Content hash for small files; size + first/last MB for big ones (caffemodels)."""
    path = Path(path)
    if path.stat().st_size < (4 << 20):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return model_id(path)


class Stages:
    """Runs named stages, skipping those whose recorded inputs match and whose outputs exist."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
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


def scale_schedule(param, share: float) -> None:
    """Shrink a solver's iteration schedule (max_iter, lr steps, test and snapshot intervals) to `share` of
    it: a method's phase runs the solver's schedule compressed into its part of the iterations."""
    if share == 1.0:
        return
    param.max_iter = max(1, round(param.max_iter * share))
    for name in ("stepsize", "test_interval", "snapshot"):
        if param.HasField(name) and getattr(param, name) > 0:
            setattr(param, name, max(1, round(getattr(param, name) * share)))
    steps = [max(1, round(v * share)) for v in param.stepvalue]
    del param.stepvalue[:]
    param.stepvalue.extend(steps)


def _trainer(config: CompressConfig) -> Callable[..., Path]:
    """train.train, or its data-parallel twin when --mpi N is given."""
    if not config.mpi:
        return train.train
    return partial(data_parallel.launch, config.mpi)


def finetune_solver(config: CompressConfig, net: Path, work: Path, val_entries: int | None,
                    share: float = 1.0, lr: float = 1.0) -> Path:
    """The user's solver pointed at the CLIP-Q net, snapshotting under work/finetune/, seeded by the
    search's seed; with validation data, its periodic test (if any) covers the validation LMDB once.
    `share` < 1: a phase with that part of the iterations (`scale_schedule`); `lr`: base_lr multiplied."""
    param = caffe_io.read_text_proto(config.solver, "SolverParameter", "solver prototxt")
    param.base_lr *= lr
    param.net = str(net.resolve())
    param.ClearField("train_net")
    param.snapshot_prefix = str((work / "finetune" / "clipq").resolve())
    param.random_seed = config.settings.seed
    if config.max_iter is not None:
        param.max_iter = config.max_iter  # positive: CompressConfig.check_inputs
    elif config.aids.epochs is not None:  # the whole schedule, steps included, stretched to the epochs
        scale_schedule(param, finetune_iterations(config, net) / param.max_iter)
    scale_schedule(param, share)
    if val_entries is not None and len(param.test_iter):
        batch = caffe_io.test_data_layer(caffe_io.read_net_param(net), str(net)).data_param.batch_size
        del param.test_iter[:]
        param.test_iter.append(-(-val_entries // batch))
    path = work / "finetune_solver.prototxt"
    with atomic_write(path) as f:
        f.write(f"# {config.solver} for `clipq compress` (net, snapshot_prefix, random_seed"
                f"{', test_iter' if val_entries and len(param.test_iter) else ''}"
                f"{f', base_lr x{lr:g}' if lr != 1.0 else ''} replaced"
                f"{f'; schedule scaled to {share:g} of it' if share != 1.0 else ''})\n{param}")
    return path


def finetune_iterations(config: CompressConfig, net: Path) -> int:
    """The fine-tuning's iterations in all phases together: --max-iter, --finetune-epochs of the TRAIN LMDB of
    `net` (the images one iteration takes: its batch x the solver's iter_size x the MPI ranks), or the
    solver's max_iter."""
    solver = caffe_io.read_text_proto(config.solver, "SolverParameter", "solver prototxt")
    if config.max_iter is not None:
        return config.max_iter
    if config.aids.epochs is None:
        return solver.max_iter
    data = caffe_io.test_data_layer(caffe_io.read_net_param(net), str(net), "TRAIN").data_param
    images = caffe_io.lmdb_entries(data.source, "training LMDB")
    per_iteration = data.batch_size * max(solver.iter_size, 1) * max(config.mpi, 1)
    return max(1, math.ceil(config.aids.epochs * images / per_iteration))


def keep_snapshots_of(directory: Path, inputs: dict) -> None:
    """Empty a fine-tuning's snapshot directory unless its snapshots were made with these inputs: a rerun
    resumes its own interrupted training, never one of another plan or solver."""
    key = json.dumps(inputs, sort_keys=True)
    stamp = directory / "inputs.json"
    if directory.exists() and (not stamp.exists() or stamp.read_text() != key):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(stamp) as f:
        f.write(key)


@dataclass(frozen=True)
class Nets:
    """The plain train_val as the pipeline runs it: TEST on the test set (`test`), and on the validation LMDB
    (`val`); and the net the fine-tuning trains (`train`): TRAIN on the seed's order of the training images,
    its periodic test on the validation LMDB (or the test set without one)."""

    test: Path
    val: Path | None
    train: Path


SHUFFLE_MAX_BYTES = 8 << 30  # a training LMDB larger than this is read in its own order (the copy would be too)


def shuffled_training_data(net_param, source: str, seed: int, out: Path, log) -> Path | None:
    """A copy of the net's TRAIN LMDB in the order of `seed` (Caffe's Data layer reads an LMDB in key order, so
    without it every seed trains on the same minibatches); None, with a message, if the LMDB is too large."""
    lmdb_path = Path(caffe_io.test_data_layer(net_param, source, "TRAIN").data_param.source)
    if sum(f.stat().st_size for f in lmdb_path.glob("*.mdb")) > SHUFFLE_MAX_BYTES:
        log(f"[data] {lmdb_path} is larger than {SHUFFLE_MAX_BYTES >> 30} GB: fine-tuning reads it in its own order")
        return None
    shuffled = out / f"train_order_seed{seed}_lmdb"
    if not shuffled.exists():
        caffe_io.copy_lmdb(lmdb_path, shuffled, lambda n: np.random.default_rng([seed, 1]).permutation(n),
                           "training LMDB")
    return shuffled


def prepare_nets(config: CompressConfig, log=print) -> Nets:
    plain = caffe_io.read_net_param(config.model)
    absolute_sources(plain, Path.cwd())
    test = config.out / "plain_train_val.prototxt"
    with atomic_write(test) as f:
        f.write(str(plain))
    val = None
    if config.val is not None:
        val = config.out / "plain_val_train_val.prototxt"
        with atomic_write(val) as f:
            f.write(f"# {config.model} with its TEST Data layer reading the validation LMDB {config.val}\n"
                    f"{caffe_io.with_test_source(plain, config.val, str(config.model))}")
    finetuned = caffe_io.read_net_param(val) if val else plain
    order = shuffled_training_data(plain, str(config.model), config.settings.seed, config.out, log)
    if order is not None:
        finetuned = caffe_io.with_test_source(finetuned, order, str(config.model), "TRAIN")
    if config.aids.distill:
        counts = {w.name: len(w.blobs) for w in caffemodel.read(config.weights)}
        finetuned = distill.with_teacher(finetuned, counts, config.aids.distill, config.aids.distill_weight,
                                         str(config.model))
    train = config.out / "plain_finetune_train_val.prototxt"
    with atomic_write(train) as f:
        f.write(f"# {config.model} as fine-tuned: TRAIN reads {order or 'its LMDB'}, the periodic test "
                f"{config.val or 'its TEST data'}"
                f"{f'; distilled from {config.weights} at T = {config.aids.distill:g}' if config.aids.distill else ''}"
                f"\n{finetuned}")
    return Nets(test, val, train)


def score_val(prototxt: Path, weights: Path, correct_path: Path) -> dict:
    """Top-1 on the validation LMDB; the per-image results are kept for paired drops."""
    correct = caffe_io.correct_per_image(prototxt, weights)
    with atomic_write(correct_path, "wb") as f:
        np.save(f, correct)
    return {"accuracy": float(correct.mean()), "images": int(correct.size)}


def evaluate_baseline(config: CompressConfig, nets: Nets) -> dict:
    scores = {"test": caffe_io.evaluate(nets.test, config.weights)}
    if nets.val is not None:
        scores["val"] = score_val(nets.val, config.weights, config.out / "baseline_val_correct.npy")
        scores["train_sample"] = score_training_sample(config, nets, scores["val"]["images"])
    return scores


def score_training_sample(config: CompressConfig, nets: Nets, count: int) -> dict:
    """Top-1 of the baseline on `count` random training images (as many as --val has): a baseline that never
    saw the validation images scores clearly better on its training images (`budget.validation_looks_seen`)."""
    plain = caffe_io.read_net_param(nets.test)
    source = subset_eval.training_source(plain, str(config.model))
    count = min(count, caffe_io.lmdb_entries(source, "training LMDB"))
    sample = config.out / f"train_sample_{count}_lmdb"
    if not sample.exists():
        subset_eval.write_subset(source, count, 0, sample)
    net = config.out / "plain_train_sample_train_val.prototxt"
    with atomic_write(net) as f:
        f.write(str(caffe_io.with_test_source(plain, sample, str(config.model))))
    correct = caffe_io.correct_per_image(net, config.weights)
    return {"accuracy": float(correct.mean()), "images": int(correct.size)}


class Diverged(ClipqError):
    """A fine-tuning that ended with NaN or Inf weights."""


def method_layers(method: Method, trained: Path, plain_net) -> list[sparse_codec.Layer]:
    """Every layer with weights of a trained method caffemodel as the codec stores it: the method's
    layers as its export says, the others raw."""
    types = {layer.name: layer.type for layer in plain_net.layer}
    by_name = {layer.name: layer for layer in caffemodel.read(trained) if layer.blobs}
    for name in method.layers():
        if not all(np.isfinite(b).all() for b in by_name[name].blobs):
            raise Diverged(f"{trained}: layer {name} has NaN or Inf values: the fine-tuning diverged (try a lower "
                           "learning rate)")
    stored = method.export({n: by_name[n].blobs for n in method.layers()})
    layers = []
    for name, layer in by_name.items():
        if distill.is_teacher(name):  # the frozen teacher of a distilled fine-tuning is no part of the model
            continue
        if name in stored:
            s = stored[name]
            bias = [np.asarray(b, np.float32) for b in layer.blobs[1:2]] if method.bias[name] else []
            # p: the share of zeros the method left (DNS and LC decide it); a layer it pruned entirely has no
            # pruning rate in [0, 1): null there (its `nonzero`, 0, says so)
            zeros = float(np.mean(s.codes == 0))
            layers.append(sparse_codec.Layer(name, types[name], [s.weights] + bias, s.codes, s.codebook, s.bits,
                                             zeros if zeros < 1 else None))
        else:
            layers.append(sparse_codec.Layer(name, types.get(name, layer.type), layer.blobs))
    return layers


def prepare_phase(phase, start: Path, layers: list[str], out: Path, teacher: str | None = None) -> str:
    """Write the phase's starting caffemodel: `phase.prepare` on the compressed layers' blobs (if the phase has
    one), and the baseline `teacher`'s layers under the teacher's names when the fine-tuning distills."""
    trained = [w for w in caffemodel.read(start) if not distill.is_teacher(w.name)]
    prepared = phase.prepare({w.name: w.blobs for w in trained if w.name in layers}) if phase.prepare else {}
    weights = [caffemodel.LayerWeights(w.name, w.type, prepared.get(w.name, w.blobs)) for w in trained]
    if teacher is not None:
        weights += distill.teacher_layers(teacher)
    caffemodel.write(weights, out)
    return str(out)


def compress_plan(config: CompressConfig, nets: Nets, stages: Stages, plan_path: Path, init_weights: Path,
                  log) -> dict:
    """One CLIP-Q plan through `compress_method` (the ClipQ method)."""
    net = caffe_io.read_net_param(nets.test)
    plan = load_plan(plan_path)
    convert.check_plan(net, plan, str(plan_path))
    plan = convert.with_sharers(net, plan)  # layers sharing weights with a planned one follow it
    ramp = round(config.aids.ramp * finetune_iterations(config, nets.train))
    method = ClipQ("clipq", {"plan": file_id(plan_path), **({"ramp": ramp} if ramp else {})}, plan=plan, ramp=ramp)
    return {**compress_method(config, nets, stages, method, init_weights, log), "plan": str(plan_path)}


def write_method_net(plain: Path, phase, title: str, out: Path) -> None:
    with atomic_write(out) as f:
        f.write(f"# {title}: {plain.name} with the method's Python layers\n"
                f"{convert.to_method_net(caffe_io.read_net_param(plain), phase.roles)}")


def run_phase(config: CompressConfig, nets: Nets, stages: Stages, method, phase, work: Path, weights: Path,
              prefix: str, log) -> tuple[Path, Path]:
    """prepare -> convert -> `caffe train` of one phase in `work`; (its test-set net, its trained weights)."""
    settings = json.dumps(method.settings, sort_keys=True, default=str)
    start = weights
    if phase.prepare is not None or config.aids.distill:
        start = work / "start.caffemodel"
        teacher = str(config.weights) if config.aids.distill else None
        inputs = {"weights": file_id(weights), "method": settings, **({"teacher": teacher} if teacher else {})}
        stages.run(f"{prefix}prepare", inputs, [start],
                   lambda: prepare_phase(phase, weights, method.layers(), start, teacher), log)
    title = f"{method.name}, phase {phase.name}"
    test_net = work / f"{method.name}_train_val.prototxt"
    stages.run(f"{prefix}convert", {"model": file_id(nets.test), "method": settings}, [test_net],
               lambda: write_method_net(nets.test, phase, title, test_net), log)
    # the fine-tuning monitors the validation images, never the test images
    train_net = work / f"{method.name}_finetune_train_val.prototxt"
    stages.run(f"{prefix}convert-finetune", {"model": file_id(nets.train), "method": settings}, [train_net],
               lambda: write_method_net(nets.train, phase, title, train_net), log)
    val_entries = caffe_io.lmdb_entries(config.val) if config.val is not None else None
    finetuned = work / "finetuned.caffemodel"
    solver = finetune_solver(config, train_net, work, val_entries, phase.share, method.lr)
    finetune_in = {"net": file_id(train_net), "solver": file_id(solver), "init": file_id(start)}

    def finetune():
        keep_snapshots_of(work / "finetune", finetune_in)
        return str(_trainer(config)(solver, output=finetuned, weights=start, log=work / "finetune.log",
                                    progress=config.progress))

    stages.run(f"{prefix}finetune", finetune_in, [finetuned], finetune, log)
    return test_net, finetuned


def compress_method(config: CompressConfig, nets: Nets, stages: Stages, method, init_weights: Path, log,
                    test: bool = True) -> dict:
    """A compression method (`clipq.methods`) through its fine-tuning phases in Caffe, then encode (its export,
    in the .clipq codec) -> decode -> evaluate, in the directory of `stages` (resumable stage by stage). A
    single-phase method works in that directory itself, a multi-phase one in a subdirectory per phase.
    `test` False: only the validation images are scored (a tuning trial never sees the test set)."""
    work = stages.path.parent
    set_biases(method, nets)
    phases = method.phases()
    weights = Path(init_weights)
    for phase in phases:
        single = len(phases) == 1
        test_net, weights = run_phase(config, nets, stages, method, phase, work if single else work / phase.name,
                                      weights, "" if single else f"{phase.name}/", log)
    return {**package(config, nets, stages, method, weights, test_net, log, test), "test_net": str(test_net)}


def set_biases(method: Method, nets: Nets) -> None:
    """Tell the method which of its layers have a bias blob (from the plain net)."""
    plain = caffe_io.read_net_param(nets.test)
    method.bias = {layer.name: convert.own_blobs(layer) == 2 for layer in plain.layer if layer.name in method.layers()}


def package(config: CompressConfig, nets: Nets, stages: Stages, method, weights: Path, test_net: Path, log,
            test: bool = True) -> dict:
    """A trained method caffemodel through encode (the method's export, in the .clipq codec) -> decode ->
    evaluate (the method net `test_net` and the decoded plain net on the test set unless `test` is False; the
    decoded one on the validation set), in the directory of `stages`."""
    work = stages.path.parent
    plain = caffe_io.read_net_param(nets.test)
    packed = work / "model.clipq"

    def encode():
        data = sparse_codec.encode(method_layers(method, weights, plain),
                                   {"prototxt": Path(config.model).name, "method": method.name}, config.huffman)
        with atomic_write(packed, "wb") as f:
            f.write(data)

    settings = json.dumps(method.settings, sort_keys=True, default=str)
    stages.run("encode", {"weights": file_id(weights), "method": settings, "huffman": config.huffman}, [packed],
               encode, log)
    decoded = work / "decoded.caffemodel"
    stages.run("decode", {"clipq": file_id(packed)}, [decoded],
               lambda: compressed_model.decode_file(packed, decoded), log)

    def evaluate():
        # One net at a time: the rc3 fallback build cannot have two nets reading one LMDB at once.
        scores = ({"method_net": caffe_io.evaluate(test_net, weights), "decoded": caffe_io.evaluate(nets.test, decoded)}
                  if test else {})
        if nets.val is not None:
            scores["decoded_val"] = score_val(nets.val, decoded, work / "val_correct.npy")
        return scores

    outputs = [work / "val_correct.npy"] if nets.val is not None else []
    scores = stages.run("evaluate", {"decoded": file_id(decoded), "trained": file_id(weights),
                                     "val": str(config.val), **({} if test else {"test": False})},
                        outputs, evaluate, log)
    return {"scores": scores, "clipq": str(packed), "decoded": str(decoded), "clipq_bytes": packed.stat().st_size,
            "trained": str(weights), "seconds": stages.seconds()}


def run(config: CompressConfig, log=print) -> dict:
    """Run (or resume) the pipeline; return the report (also written as report.json / report.md).
    OUT is locked meanwhile: a second run on it is refused."""
    config.check()
    with output_directory(config.out, log):
        return _run_stages(config, log)


def baseline_and_plan(config: CompressConfig, stages: Stages, nets: Nets, log) -> dict:
    """The baseline's scores and OUT/plan.yaml (the search's, or the given plan); returns the scores."""
    out = config.out
    model_in = {"model": file_id(nets.test), "weights": file_id(config.weights), "val": str(config.val)}
    baseline = stages.run("baseline", model_in, [out / "baseline_val_correct.npy"] if nets.val else [],
                          lambda: evaluate_baseline(config, nets), log)
    if budget.validation_looks_seen(baseline):
        log(f"[baseline] WARNING: {budget.seen_warning(baseline)}")

    plan_path = out / "plan.yaml"

    def copy_plan():
        with atomic_write(plan_path) as f:
            f.write(Path(config.plan).read_text())

    search_data = str(config.val) if config.search_data == "val" else None

    def search_plan():
        driver.run(nets.test, config.weights, out, None, config.settings, config.jobs, search_data,
                   progress=config.progress, log=log, ray=config.ray, batch=config.ray_batch)

    if config.plan is not None:
        stages.run("search", {"plan": file_id(config.plan)}, [plan_path], copy_plan, log)
    else:
        stages.run("search", {**model_in, "settings": asdict(config.settings), "on": config.search_data},
                   [plan_path], search_plan, log)
    return baseline


def _run_stages(config: CompressConfig, log) -> dict:
    out = config.out
    stages = Stages(out)
    nets = prepare_nets(config, log)
    baseline = baseline_and_plan(config, stages, nets, log)
    plan_path = out / "plan.yaml"
    if config.max_drop is None:
        result = compress_plan(config, nets, stages, plan_path, config.weights, log)
        rounds = None
    else:
        rounds = budget_rounds(config, nets, baseline, log)
        result = adopt(config, rounds, log)
    onnx = onnx_stage(config, nets, stages, result, log) if config.onnx else None
    report = reporting.make_report(config, baseline, result, rounds, stages.seconds(), onnx)
    with atomic_write(out / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md") as f:
        f.write(reporting.report_markdown(report))
    return report


def onnx_stage(config: CompressConfig, nets: Nets, stages: Stages, result: dict, log) -> dict:
    """The final model as ONNX next to its .clipq (`onnx_output.for_train_val`), with its top-1 in onnxruntime
    against Caffe's; a net the exporter refuses gives no file, and the report says why."""
    packed, decoded = Path(result["clipq"]), Path(result["decoded"])
    output = packed.with_suffix(".onnx")
    inputs = {"clipq": file_id(packed), "model": file_id(nets.test), "decoded": file_id(decoded)}
    previous = stages.record.get("onnx", {}).get("result") or {}
    outputs = [] if "refused" in previous else [output]  # a refusal writes no file: it is done all the same
    info = stages.run("onnx", inputs, outputs, lambda: onnx_output.for_train_val(
        nets.test, packed, decoded, output, config.out / "plain_deploy.prototxt"), log)
    if "refused" in info:
        log(f"[onnx] no ONNX: {info['refused']}")
    elif info["top1"].get("equal") is False:
        log(f"[onnx] WARNING: the ONNX model's test top-1 in onnxruntime ({info['top1']['onnx']:.4f}) differs "
            f"from Caffe's on the decoded caffemodel ({info['top1']['caffe']:.4f})")
    return info


# --- the accuracy budget -------------------------------------------------------------------------

def budget_rounds(config: CompressConfig, nets: Nets, baseline: dict, log) -> list[dict]:
    """Bisect the search's Lagrangian path (`search.budget`): each round fine-tunes one plan, warm-started from
    the full-precision weights of the smallest round that met the budget so far (the baseline before any),
    and measures its decoded model on the validation LMDB. When even the path's largest plan misses, its
    back-off plans (larger still, up to every layer at p 0, b 8) join the bisection; when the bracket is
    closed, its missed end is fine-tuned once more from the smallest model that met (`budget.Rounds`)."""
    layers = list(load_plan(config.out / "plan.yaml"))
    path = budget.lagrangian_path(read_histories(config.out, layers))
    sizes = compressed_model.SizeModel(Path(config.weights), layers)
    backoff = budget.backoff_candidates(path[0], lambda plan: sizes.bytes(plan) / sizes.original)
    schedule = budget.Rounds(budget.path_candidates(path), backoff)
    baseline_correct = np.load(config.out / "baseline_val_correct.npy")
    rounds: list[dict] = []
    init = Path(config.weights)
    for number in range(1, config.rounds + 1):
        picked = schedule.next(init)
        if picked is None:
            break
        candidate, origin = picked
        work = config.out / "rounds" / f"{number:02d}"
        plan_path = work / "plan.yaml"
        save_plan(candidate.plan, plan_path, extra={"origin": origin})
        log(f"[round {number}/{config.rounds}] {origin}, {100 * candidate.size:.2f}% of the float32 "
            f"size; fine-tuning from {init.relative_to(config.out) if init.is_relative_to(config.out) else init}")
        result = compress_plan(config, nets, Stages(work), plan_path, init, log)
        drop = budget.paired_drop(baseline_correct, np.load(work / "val_correct.npy"))
        met = budget.meets(drop, config.max_drop, config.se_margin)
        schedule.record(candidate, met)
        test_drop = 100 * (baseline["test"]["accuracy"] - result["scores"]["decoded"]["accuracy"])
        rounds.append({**result, "round": number, "origin": origin, "layers": {
                           name: {"p": rounded_rate(lp.p), "b": lp.bits} for name, lp in candidate.plan.items()},
                       "val_drop": drop.points, "val_drop_se": drop.se, "test_drop": test_drop,
                       "met": met})
        log(f"[round {number}] {result['clipq_bytes']:,} bytes, validation drop {drop.points:+.2f} "
            f"(+- {drop.se:.2f}) points: {'meets' if met else 'misses'} the budget of "
            f"{config.max_drop:g}")
        if met and all(result["clipq_bytes"] <= r["clipq_bytes"] for r in rounds if r["met"]):
            # the next, smaller plans start from the smallest model that met the budget; never from one that
            # missed it, whose weights adapted to a harsher plan than any that will follow
            init = work / "finetuned.caffemodel"
    return rounds


def chosen_round(rounds: list[dict]) -> dict:
    """The smallest round that met the budget; if none did, the one with the smallest validation drop."""
    met = [r for r in rounds if r["met"]]
    if met:
        return min(met, key=lambda r: (r["clipq_bytes"], r["round"]))
    return min(rounds, key=lambda r: (r["val_drop"], r["round"]))


def adopt(config: CompressConfig, rounds: list[dict], log) -> dict:
    """Copy the chosen round's plan, .clipq and decoded caffemodel to OUT/final_*; return its result."""
    chosen = chosen_round(rounds)
    for name in ("plan.yaml", "model.clipq", "decoded.caffemodel"):
        source = Path(chosen["plan"]).parent / name
        with atomic_write(config.out / f"final_{name}", "wb") as f:
            f.write(source.read_bytes())
    if not chosen["met"]:
        log(f"[budget] NO round met the budget of {config.max_drop:g} points on the validation data; "
            f"kept round {chosen['round']}, the smallest validation drop ({chosen['val_drop']:+.2f} points)")
    else:
        log(f"[budget] round {chosen['round']} is the smallest model within {config.max_drop:g} points: "
            f"{config.out / 'final_model.clipq'}")
    return {**chosen, "clipq": str(config.out / "final_model.clipq"),
            "decoded": str(config.out / "final_decoded.caffemodel"), "plan": str(config.out / "final_plan.yaml")}


