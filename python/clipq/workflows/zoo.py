"""`clipq zoo`: compress any Caffe model-zoo model (deploy prototxt + caffemodel) and compare it with the original.

1. prepare: a deploy (or train_val) prototxt in Caffe's deprecated formats (V0/V1 `layers`, `input:` /
   `input_dim:` fields, 3-param BatchNorm) and a V1 caffemodel are upgraded by Caffe's own
   `upgrade_net_proto_text` / `upgrade_net_proto_binary` into OUT/upgraded/. Blobs stored with the legacy
   4-D (num, channels, height, width) shape get the net's shape there too: Caffe accepts legacy shapes when
   loading, but a decoded `.clipq` stores the `shape` field, which Caffe checks exactly. The user's files
   are only read.
2. plan: `--plan FILE`, `--p P --b B` on every Convolution / InnerProduct layer, or `--search` (CLIP-Q's
   Bayesian search, which needs a train_val with LMDB Data layers).
3. compress: without `--solver` the trained weights are pruned-quantized as they are, no fine-tuning
   (encode -> OUT/model.clipq -> decode -> OUT/decoded.caffemodel); with `--solver` `clipq compress`'s
   pipeline fine-tunes in Caffe under OUT/compress/ and its decoded caffemodel is compared.
4. compare: the deploy net runs in pycaffe (TEST phase) with the original and with the decoded caffemodel
   on the same inputs (`--inputs`, or standard-normal random ones): top-1 agreement of the last output
   blob, max / mean absolute output difference, float32 bytes vs `.clipq` bytes, the paper-style table.
   -> OUT/zoo_report.json, OUT/zoo_report.md
5. ONNX (unless --no-onnx): the deploy with the `.clipq` file's weights as ONNX next to it (`onnx_output`,
   compressed layers as uint8 codes + codebook); onnxruntime runs the comparison's inputs, its last output
   compared with the decoded caffemodel's and the original's. A net the exporter refuses gives no file and
   the report says why. (With --solver the pipeline's own ONNX stage is off: the zoo's deploy is used.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from clipq.caffe import build, caffe_io, caffemodel, preflight
from clipq.caffe.convert import check_plan, compressible_layers
from clipq.caffe.param_str import WRAPPED
from clipq.plan import LayerPlan, load_plan, save_plan
from clipq.search import driver
from clipq.storage import size
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError
from clipq.util.lock import output_directory
from clipq.workflows import compressed_model, onnx_output, pipeline
from clipq.workflows.pipeline import CompressConfig

UPGRADED = "upgraded"  # OUT/upgraded/: Caffe-upgraded copies of the user's files


@dataclass(frozen=True)
class ZooConfig:
    """`clipq zoo`'s settings: a deploy net and where its (p, b) come from, around the `clipq compress` options
    it shares. `compress.model` is the deploy prototxt (Input layers or old input fields; V1 accepted),
    `compress.weights` its trained caffemodel (V1 accepted), `compress.out` the zoo's OUT, `compress.plan` a
    given plan; `compress.solver` fine-tunes (needs `train_val`; None: no fine-tuning); the search settings,
    executor (jobs, Ray), held-out data and budget are the pipeline's. The search's seed seeds the random
    inputs too."""

    compress: CompressConfig
    train_val: Path | None = None  # LMDB Data layers, TEST Accuracy; layer names as in the deploy
    p: float | None = None         # one (p, b) for every Convolution / InnerProduct layer ...
    bits: int | None = None
    search: bool = False           # ... or CLIP-Q's Bayesian search on train_val (or compress.plan)
    inputs: Path | None = None     # .npy (one input) or .npz (one array per input blob); None: random
    batch: int = 16                # inputs per forward pass; the number of random inputs

    @property
    def model(self) -> Path:
        return self.compress.model

    @property
    def weights(self) -> Path:
        return self.compress.weights

    @property
    def out(self) -> Path:
        return self.compress.out

    @property
    def plan(self) -> Path | None:
        return self.compress.plan

    @property
    def solver(self) -> Path | None:
        return self.compress.solver

    @property
    def seed(self) -> int:
        return self.compress.settings.seed


@dataclass(frozen=True)
class NetShapes:
    """What the comparison needs to know about a deploy net, read from Caffe's own instance of it."""

    inputs: dict[str, tuple[int, ...]]
    params: dict[str, list[tuple[int, ...]]]
    outputs: list[str]


# --- 1. prepare: upgrade old formats with Caffe's tools, normalize legacy blob shapes ------------------

def text_needs_upgrade(net_param) -> bool:
    """Caffe's NetNeedsUpgrade, as far as clipq cares: V0/V1 `layers`, input fields, 3-param BatchNorm."""
    old_inputs = len(net_param.input) or len(net_param.input_shape) or len(net_param.input_dim)
    old_batch_norm = any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in net_param.layer)
    return bool(len(net_param.layers) or old_inputs or old_batch_norm)


def prepare_prototxt(path: Path, out: Path, role: str) -> tuple[Path, bool]:
    """(prototxt to use, upgraded?): `path` itself, or Caffe's upgrade of it as OUT/upgraded/<role>.prototxt."""
    if not text_needs_upgrade(caffe_io.read_net_param(path)):
        return Path(path), False
    dest = out / UPGRADED / f"{role}.prototxt"
    build.run_tool("upgrade_net_proto_text", path, output=dest)
    return dest, True


def prepare_weights(path: Path, out: Path) -> tuple[Path, bool]:
    """(caffemodel to use, upgraded?): `path`, or Caffe's upgrade of a V1 one as OUT/upgraded/weights.caffemodel."""
    if not Path(path).is_file():
        raise ClipqError(f"{path}: caffemodel not found")
    if not caffemodel.is_v1(path):
        return Path(path), False
    dest = out / UPGRADED / "weights.caffemodel"
    build.run_tool("upgrade_net_proto_binary", path, output=dest)
    return dest, True


def net_shapes(deploy: Path) -> NetShapes:
    """Input, parameter and output shapes of the deploy net, as Caffe builds it (TEST phase)."""
    cf = caffe_io.caffe()
    caffe_io.set_mode()
    net = cf.Net(str(deploy), cf.TEST)
    return NetShapes({name: tuple(net.blobs[name].data.shape) for name in net.inputs},
                     {name: [tuple(b.data.shape) for b in blobs] for name, blobs in net.params.items()},
                     list(net.outputs))


def _fitted_blob(blob: np.ndarray, shape: tuple[int, ...], layer: str, weights: Path) -> np.ndarray:
    """`blob` with the net's `shape`: as it is, or from Caffe's legacy 4-D shape (1s padded on the left)."""
    if tuple(blob.shape) == shape:
        return blob
    if len(shape) <= 4 and tuple(blob.shape) == (1,) * (4 - len(shape)) + shape:
        return blob.reshape(shape)
    raise ClipqError(f"{weights}: layer '{layer}' has a blob of shape {tuple(blob.shape)}; the deploy net "
                     f"expects {shape}")


def fit_weights(weights: Path, shapes: NetShapes, out: Path) -> tuple[Path, bool]:
    """(caffemodel to use, reshaped?): check that every learnable layer of the net has weights of its shapes
    (Caffe would silently keep filler values for a missing one); write OUT/upgraded/weights.caffemodel with
    the net's shapes if some blobs have legacy 4-D shapes."""
    layers = caffemodel.read(weights)
    by_name = {layer.name: layer for layer in layers}  # of equal names, the last (Caffe copies them in order)
    missing = [name for name in shapes.params if name not in by_name]
    if missing:
        raise ClipqError(f"{weights}: no weights for layer(s) {', '.join(missing)} of the deploy net")
    reshaped = False
    for name, expected in shapes.params.items():
        layer = by_name[name]
        if len(layer.blobs) != len(expected):
            raise ClipqError(f"{weights}: layer '{name}' has {len(layer.blobs)} blobs; the deploy net expects "
                             f"{len(expected)}")
        fitted = [_fitted_blob(b, s, name, weights) for b, s in zip(layer.blobs, expected)]
        reshaped |= any(f.shape != b.shape for f, b in zip(fitted, layer.blobs))
        layer.blobs = fitted
    if not reshaped:
        return Path(weights), False
    caffemodel.write(layers, out / UPGRADED / "weights.caffemodel")  # may replace our upgraded copy: the
    return out / UPGRADED / "weights.caffemodel", True                 # blobs are views of the old file's inode


# --- 2. list and plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    weight_shape: tuple[int, ...]
    params: int    # weights + biases
    share: float   # of all the net's learnable parameters


def list_layers(deploy: Path, shapes: NetShapes) -> list[LayerInfo]:
    """The compressible (Convolution / InnerProduct) layers of the net, in net order."""
    net = caffe_io.read_net_param(deploy)
    types = {layer.name: layer.type for layer in net.layer if layer.type in WRAPPED}
    total = sum(int(np.prod(s)) for blobs in shapes.params.values() for s in blobs) or 1
    rows = []
    for name in compressible_layers(net):
        blobs = shapes.params.get(name, [])
        count = sum(int(np.prod(s)) for s in blobs)
        rows.append(LayerInfo(name, types[name], blobs[0] if blobs else (), count, count / total))
    return rows


def render_layers(rows: list[LayerInfo], fmt: str = "text") -> str:
    """The layer list as an aligned text table, Markdown, or JSON."""
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2)
    head = ["Layer", "Type", "Weight shape", "Parameters", "Share"]
    body = [[r.name, r.type, " x ".join(map(str, r.weight_shape)), f"{r.params:,}", f"{r.share:.1%}"]
            for r in rows]
    if fmt == "md":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in [head] + body)


def check_config(config: ZooConfig) -> None:
    """Exactly one source of (p, b); the search and the fine-tuning need a train_val; the given files are
    what they claim to be (`preflight`)."""
    sources = [config.plan is not None, config.p is not None or config.bits is not None, config.search]
    if sum(sources) != 1:
        raise ClipqError("give exactly one of --plan FILE, --p P --b B, or --search")
    if (config.p is None) != (config.bits is None):
        raise ClipqError("--p and --b go together (one pruning rate and bit width for every layer)")
    if config.search and config.train_val is None:
        raise ClipqError("--search needs --train-val: a train_val prototxt with LMDB Data layers (TRAIN images "
                         "for the search's subset, TEST Accuracy), layer names as in the deploy")
    if config.solver is not None and config.train_val is None:
        raise ClipqError("--solver needs --train-val: the train_val prototxt the solver fine-tunes")
    if config.compress.max_drop is not None and not (config.search and config.solver is not None):
        raise ClipqError("--max-drop needs --search and --solver (each round fine-tunes a searched plan) "
                         "and --val (the held-out images it is measured on)")
    if config.batch < 1:
        raise ClipqError(f"--batch must be at least 1, got {config.batch}")
    for path in (config.model, config.weights, config.plan, config.train_val, config.solver, config.inputs):
        if path is not None and not Path(path).is_file():
            raise ClipqError(f"{path}: file not found")
    preflight.check_net(config.model)  # before OUT is made: a bad input leaves nothing behind
    if config.train_val is not None:
        preflight.check_net(config.train_val, what="--train-val")
    if not caffemodel.is_v1(config.weights):  # (a V1 caffemodel is checked once Caffe has upgraded it)
        preflight.caffemodel_layers(config.weights)


def uniform_plan(deploy_param, p: float, bits: int) -> dict[str, LayerPlan]:
    """The same (p, b) for every Convolution / InnerProduct layer."""
    try:
        lp = LayerPlan(p, bits)
    except ValueError as e:
        raise ClipqError(f"--p/--b: {e}") from None
    return {name: lp for name in compressible_layers(deploy_param)}


def make_plan(config: ZooConfig, deploy: Path, weights: Path, train_val: Path | None, log) -> tuple[dict, str]:
    """(plan checked against the deploy net, how it was made): given, uniform, or searched on train_val."""
    deploy_param = caffe_io.read_net_param(deploy)
    if config.plan is not None:
        plan, source = load_plan(config.plan), f"given ({config.plan})"
    elif config.p is not None:
        plan, source = uniform_plan(deploy_param, config.p, config.bits), f"uniform p={config.p:g}, b={config.bits}"
    else:
        cc = config.compress
        on_val = cc.val is not None and cc.search_on != "train"
        log(f"[search] CLIP-Q Bayesian search on {cc.val if on_val else config.train_val} ...")
        plan = driver.run(train_val, weights, config.out / "search", None, cc.settings, cc.jobs,
                          str(cc.val) if on_val else None, progress=cc.progress, log=log, ray=cc.ray,
                          batch=cc.ray_batch)
        source = (f"searched (lambda {cc.settings.lam:g}, {cc.settings.iterations} iterations per layer, "
                  f"error on {'the validation LMDB' if on_val else 'a training subset'})")
    check_plan(deploy_param, plan, str(config.model))
    if not plan:
        raise ClipqError(f"{config.model}: the plan compresses no layer (no Convolution / InnerProduct layers?)")
    return plan, source


# --- 3. compress --------------------------------------------------------------------------------------

def compress_without_finetuning(deploy: Path, weights: Path, plan: dict[str, LayerPlan], out: Path,
                                huffman: bool) -> tuple[Path, Path]:
    """(.clipq, decoded caffemodel): the trained weights pruned-quantized as they are, no fine-tuning."""
    packed, decoded = out / "model.clipq", out / "decoded.caffemodel"
    compressed_model.encode_file(deploy, weights, packed, plan, huffman)
    compressed_model.decode_file(packed, decoded, deploy)
    return packed, decoded


def compress_with_solver(config: ZooConfig, deploy: Path, train_val: Path, weights: Path, plan_path: Path,
                         log) -> tuple[Path, Path, dict]:
    """(.clipq, decoded caffemodel, pipeline report): `clipq compress` with the plan, under OUT/compress/;
    the result is checked against the deploy net (a train_val with other layer names would leave the
    deploy's layers at their filler values without a word from Caffe)."""
    report = pipeline.run(replace(config.compress, model=train_val, weights=weights, out=config.out / "compress",
                                  plan=plan_path, onnx=False), log=log)
    packed = Path(report["clipq"])
    compressed_model.check_against(compressed_model.read_file(packed)[1], deploy, str(packed))
    return packed, Path(report["decoded"]), report


# --- 4. compare ---------------------------------------------------------------------------------------

def load_inputs(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Preprocessed inputs from a .npy file (nets with one input) or a .npz file (one array per input blob,
    named as the blob); each N x (the input's shape without its batch axis)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {next(iter(shapes)): loaded} if isinstance(loaded, np.ndarray) else dict(loaded.items())
    except (OSError, ValueError) as e:
        raise ClipqError(f"{path}: cannot read as .npy/.npz ({e})") from None
    if isinstance(loaded, np.ndarray):
        if len(shapes) != 1:
            raise ClipqError(f"{path}: the net has inputs {', '.join(shapes)}; give an .npz with one array each")
    else:
        loaded.close()
        if set(arrays) != set(shapes):
            raise ClipqError(f"{path}: holds arrays {', '.join(sorted(arrays))}; the net's inputs are "
                             f"{', '.join(shapes)}")
    for name, shape in shapes.items():
        if arrays[name].ndim != len(shape) or arrays[name].shape[1:] != shape[1:] or not len(arrays[name]):
            raise ClipqError(f"{path}: input '{name}' has shape {arrays[name].shape}; the net expects "
                             f"N x {' x '.join(map(str, shape[1:]))}")
    if len({len(a) for a in arrays.values()}) != 1:
        raise ClipqError(f"{path}: the inputs have different numbers of samples")
    return {name: np.asarray(arrays[name], np.float32) for name in shapes}


def random_inputs(shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` standard-normal samples for every input blob."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((count,) + shape[1:], dtype=np.float32) for name, shape in shapes.items()}


def forward(deploy: Path, weights: Path, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Every output blob of the deploy net (TEST phase) for `inputs`, run `batch` samples at a time."""
    cf = caffe_io.caffe()
    caffe_io.set_mode()
    net = cf.Net(str(deploy), str(weights), cf.TEST)
    count = len(next(iter(inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in net.outputs}
    for start in range(0, count, batch):
        for name, array in inputs.items():
            part = array[start:start + batch]
            net.blobs[name].reshape(*part.shape)
            net.blobs[name].data[...] = part
        result = net.forward()
        for name in net.outputs:
            chunks[name].append(np.atleast_1d(result[name].copy()))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def compare_outputs(original: np.ndarray, decoded: np.ndarray) -> dict:
    """Top-1 agreement (argmax over axis 1; None for an output without a class axis) and |difference|."""
    diff = np.abs(original.astype(np.float64) - decoded.astype(np.float64))
    agree = None
    if original.ndim >= 2:
        top1 = np.argmax(original, axis=1)
        same = top1 == np.argmax(decoded, axis=1)
        agree = {"top1_agreement": float(same.mean()), "agreeing": int(same.sum()), "compared": int(same.size),
                 "original_classes": int(np.unique(top1).size)}  # 1: every input gets one class (typical of noise)
    return {**(agree or {"top1_agreement": None}), "max_abs_diff": float(diff.max(initial=0.0)),
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "max_abs_original": float(np.abs(original).max(initial=0.0))}


def comparison(config: ZooConfig, deploy: Path, weights: Path, decoded: Path, shapes: NetShapes) -> dict:
    """Original vs decoded caffemodel through the deploy net on the same inputs; the last output decides."""
    return compare_models(config, deploy, weights, decoded, shapes)[0]


def compare_models(config: ZooConfig, deploy: Path, weights: Path, decoded: Path,
                   shapes: NetShapes) -> tuple[dict, tuple[dict, np.ndarray, np.ndarray]]:
    """(`comparison`'s result, (the inputs, the original's and the decoded's last output))."""
    if config.inputs is not None:
        inputs, described = load_inputs(config.inputs, shapes.inputs), str(config.inputs)
    else:
        inputs = random_inputs(shapes.inputs, config.batch, config.seed)
        described = f"random standard normal (seed {config.seed})"
    before = forward(deploy, weights, inputs, config.batch)
    after = forward(deploy, decoded, inputs, config.batch)
    per_output = {name: compare_outputs(before[name], after[name]) for name in shapes.outputs}
    last = shapes.outputs[-1]
    return ({"inputs": described, "random_inputs": config.inputs is None,
             "samples": len(next(iter(inputs.values()))), "output": last, **per_output[last], "outputs": per_output},
            (inputs, before[last], after[last]))


# --- the whole command --------------------------------------------------------------------------------

def prepare(config: ZooConfig) -> dict:
    """Upgraded / normalized files to work with: {'deploy', 'weights', 'train_val', 'shapes', 'upgraded'}."""
    work = (config.out / UPGRADED).resolve()
    for path in (config.model, config.weights, config.train_val):
        if path is not None and Path(path).resolve().parent == work:
            raise ClipqError(f"{path}: is inside {work}, where clipq zoo writes; use another --out")
    deploy, deploy_up = prepare_prototxt(config.model, config.out, "deploy")
    if deploy_up:  # the user's V1 net could not be checked as it was
        preflight.check_net(deploy)
    weights, weights_up = prepare_weights(config.weights, config.out)
    shapes = net_shapes(deploy)
    weights, reshaped = fit_weights(weights, shapes, config.out)
    train_val, tv_up = (prepare_prototxt(config.train_val, config.out, "train_val") if config.train_val
                        else (None, False))
    upgraded = {"prototxt": deploy_up, "caffemodel": weights_up, "legacy_blob_shapes": reshaped,
                "train_val": tv_up}
    return {"deploy": deploy, "weights": weights, "train_val": train_val, "shapes": shapes, "upgraded": upgraded}


def list_compressible(config: ZooConfig) -> list[LayerInfo]:
    """`clipq zoo --list`: the compressible layers (the deploy upgraded first if it is in an old format)."""
    deploy, _ = prepare_prototxt(config.model, config.out, "deploy")
    preflight.check_net(deploy)
    return list_layers(deploy, net_shapes(deploy))


def run(config: ZooConfig, log=print) -> dict:
    """Compress the model and compare it with the original; write OUT/zoo_report.json and .md; return the report.
    OUT is locked meanwhile: a second run on it is refused."""
    check_config(config)
    with output_directory(config.out, log):
        return _compress_and_compare(config, log)


def _compress_and_compare(config: ZooConfig, log) -> dict:
    files = prepare(config)
    if any(files["upgraded"].values()):
        log(f"[prepare] upgraded to the current Caffe format under {config.out / UPGRADED}")
    plan_path = config.out / "plan.yaml"
    finetune = None
    if config.compress.max_drop is not None:  # the pipeline searches, then chooses the plan round by round
        packed, decoded, finetune = compress_with_solver(config, files["deploy"], files["train_val"], files["weights"],
                                                         None, log)
        plan_source = (f"searched, then the smallest of {len(finetune['budget']['rounds'])} fine-tuned rounds "
                       f"within --max-drop {config.compress.max_drop:g} on {config.compress.val}"
                       + ("" if finetune["budget"]["met"] else " (NOT met: the smallest drop kept)"))
        save_plan(load_plan(finetune["plan"]), plan_path, extra={"source": plan_source})
    else:
        plan, plan_source = make_plan(config, files["deploy"], files["weights"], files["train_val"], log)
        save_plan(plan, plan_path, extra={"source": plan_source})
        if config.solver is None:
            log("[compress] pruning-quantizing the trained weights (no fine-tuning) ...")
            packed, decoded = compress_without_finetuning(files["deploy"], files["weights"], plan, config.out,
                                                          config.compress.huffman)
        else:
            packed, decoded, finetune = compress_with_solver(config, files["deploy"], files["train_val"],
                                                             files["weights"], plan_path, log)
    log("[compare] original vs decoded caffemodel ...")
    compared, (inputs, original, decoded_output) = compare_models(config, files["deploy"], files["weights"], decoded,
                                                                  files["shapes"])
    onnx = None
    if config.compress.onnx:
        log("[onnx] the compressed model as ONNX, run in onnxruntime on the same inputs ...")
        onnx = onnx_output.for_deploy(files["deploy"], packed, packed.with_suffix(".onnx"), inputs,
                                      compared["output"], original, decoded_output)
        if "refused" in onnx:
            log(f"[onnx] no ONNX: {onnx['refused']}")
    report = make_report(config, files, plan_path, plan_source, packed, decoded, compared, finetune, onnx)
    with atomic_write(config.out / "zoo_report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(config.out / "zoo_report.md") as f:
        f.write(report_markdown(report))
    return report


def make_report(config: ZooConfig, files: dict, plan_path: Path, plan_source: str, packed: Path, decoded: Path,
                compared: dict, finetune: dict | None, onnx: dict | None = None) -> dict:
    header, layers = compressed_model.read_file(packed)
    total = size.overall(layers)
    clipq_bytes = packed.stat().st_size
    return {
        "model": str(config.model), "weights": str(config.weights),
        "used": {"deploy": str(files["deploy"]), "weights": str(files["weights"]),
                 "train_val": str(files["train_val"]) if files["train_val"] else None},
        "upgraded": files["upgraded"],
        "plan": {"file": str(plan_path), "source": plan_source},
        "finetuned": finetune is not None, "solver": str(config.solver) if config.solver else None,
        "finetune_accuracy": finetune["accuracy"] if finetune else None,
        "budget": finetune["budget"] if finetune else None,
        "size": {"caffemodel_bytes": Path(config.weights).stat().st_size, "float32_bytes": total.original,
                 "clipq_file_bytes": clipq_bytes, "rate": total.original / clipq_bytes, "huffman": header["huffman"]},
        "comparison": compared,
        "layers": [asdict(r) | {"rate": r.rate} for r in size.rows(layers) + [total]],
        "files": {"clipq": str(packed), "decoded": str(decoded)},
        "onnx": onnx,
    }


def _table(report: dict, fmt: str) -> str:
    rows = [size.Row(**{k: v for k, v in r.items() if k != "rate"}) for r in report["layers"]]
    return size.render(rows, fmt)


def summary_lines(report: dict) -> list[str]:
    """The report's facts as sentences (shared by the text and Markdown forms)."""
    s, c = report["size"], report["comparison"]
    upgraded = [name for name, done in report["upgraded"].items() if done]
    agreement = ("n/a (the output has no class axis)" if c["top1_agreement"] is None else
                 f"{c['top1_agreement']:.4f} ({c['agreeing']}/{c['compared']}; the original predicts "
                 f"{c['original_classes']} distinct class{'es' if c['original_classes'] != 1 else ''})")
    if c.get("original_classes") == 1 and c["compared"] > 1:
        agreement += (" -- one class for every input, so agreement says little: give real inputs with --inputs"
                      if c.get("random_inputs", True) else
                      " -- all inputs got one class, so agreement says little about the other classes")
    lines = [
        f"model: {report['model']} + {report['weights']}"
        + (f" (upgraded by Caffe: {', '.join(upgraded)})" if upgraded else ""),
        f"plan: {report['plan']['source']} -> {report['plan']['file']}",
        f"fine-tuning: {'with ' + report['solver'] if report['finetuned'] else 'none (weights compressed as trained)'}",
        f"size: float32 weights {s['float32_bytes']:,} bytes (caffemodel file {s['caffemodel_bytes']:,}) -> "
        f".clipq {s['clipq_file_bytes']:,} bytes, {s['rate']:.1f}x" + (" (Huffman)" if s["huffman"] else ""),
        f"compared on {c['samples']} inputs, {c['inputs']}; output blob '{c['output']}'",
        f"top-1 agreement with the original: {agreement}",
        f"output |difference|: max {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g} "
        f"(original max |output| {c['max_abs_original']:.3g})",
    ]
    if report["finetune_accuracy"]:
        acc = report["finetune_accuracy"]
        lines.append(f"test top-1: baseline {acc['baseline']:.4f}, decoded {acc['decoded']:.4f}")
    if "onnx" in report:
        lines.append(onnx_line(report["onnx"]))
    return lines


def onnx_line(onnx: dict | None) -> str:
    """The ONNX file: its name and size, and its output in onnxruntime against the decoded caffemodel's."""
    if onnx is None:
        return "ONNX: not written (--no-onnx)"
    if "refused" in onnx:
        return f"no ONNX: {onnx['refused']}"
    line = onnx_output.file_summary(onnx, Path(onnx["file"]).name)
    c = onnx["comparison"]
    if "skipped" in c:
        return line + f"not run: {c['skipped']}"
    if "compared" not in c:
        return line + f"onnxruntime's '{c['output']}' differs from the decoded caffemodel's by at most " \
                      f"{c['max_abs_diff_decoded']:.3g}"
    same = c["agreeing_decoded"] == c["compared"]
    return (line + f"onnxruntime's top-1 on the same inputs: agreement with the original "
            f"{c['top1_agreement_original']:.4f} ({c['agreeing_original']}/{c['compared']}), "
            + ("the same as the decoded caffemodel's" if same else
               f"DIFFERS FROM THE DECODED CAFFEMODEL'S on {c['compared'] - c['agreeing_decoded']} of {c['compared']}")
            + f"; max |difference| from the decoded caffemodel's output {c['max_abs_diff_decoded']:.3g}")


def report_markdown(report: dict) -> str:
    """OUT/zoo_report.md."""
    lines = [f"# clipq zoo: {Path(report['model']).name}", ""] + [f"- {line}" for line in summary_lines(report)]
    return "\n".join(lines + ["", _table(report, "md"), ""])


def report_text(report: dict) -> str:
    """What `clipq zoo` prints by default."""
    return "\n".join(summary_lines(report) + ["", _table(report, "text")])
