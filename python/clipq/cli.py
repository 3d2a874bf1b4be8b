"""The `clipq` command line: one subcommand per library call, listed in workflow order."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import clipq
from clipq import processes
from clipq.errors import ClipqError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `clipq <command>: <message>`, like clipq's own (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda x: x >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _number(text, float, lambda x: x > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return _number(text, float, lambda x: x >= 0, "a number >= 0")


def _fraction_or_zero(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(text, float, lambda x: 0 <= x < 1, "a number in [0, 1)")


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    return _number(text, float, lambda x: 0 < x < 1, "a number between 0 and 1 (exclusive)")


def _number(text: str, kind: type, valid, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def shape_chw(text: str) -> tuple[int, int, int]:
    """argparse type: C,H,W (e.g. 1,28,28)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(x) for x in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape[0] not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected C,H,W with C 1 or 3 (e.g. 1,28,28), got {text!r}")
    return shape


def new_dir(text: str) -> Path:
    """argparse type: a directory to create (an existing one is refused: nothing is overwritten)."""
    path = Path(text)
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text}: already exists; give a new directory (nothing is overwritten)")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write (an existing file is replaced; a directory is refused)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; give the name of the file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent}: is not a directory")
    return path


def work_dir(text: str) -> Path:
    """argparse type: a work directory (an existing one is resumed; an existing file is refused)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    return path


def distinct_output(output: Path, **inputs) -> None:
    """Refuse an output that is one of the command's input files (it would be replaced before it is read)."""
    for flag, path in inputs.items():
        if path is not None and output.resolve() == Path(path).resolve():
            raise ClipqError(f"{output}: is also the {flag} file; write the output elsewhere")


def _doctor(args) -> int:
    from clipq import doctor

    return 0 if doctor.report(sys.stdout) else 1


def _convert(args) -> int:
    from clipq import convert, plan, preflight

    distinct_output(args.output, model=args.model, plan=args.plan)
    preflight.net(args.model)
    layers = convert.convert_file(args.model, plan.load_plan(args.plan), args.output)
    print(f"{args.output}: {len(layers)} CLIP-Q layer(s): {', '.join(layers)}")
    return 0


def _export(args) -> int:
    from clipq import convert, preflight

    distinct_output(args.output, model=args.model, weights=args.weights)
    preflight.net(args.model)
    preflight.caffemodel_layers(args.weights)
    summary = convert.export(args.model, args.weights, args.output)
    for name, facts in summary.items():
        print(f"{name:<24} p={facts['p']:<6g} b={facts['bits']}  kept {facts['kept']:.2%}")
    print(f"{args.output}: plain caffemodel with the quantized weights")
    return 0


def _size_table(layers, fmt: str, paper_plan=None, extra=None) -> str:
    from clipq import size

    table = size.rows(layers) + [size.overall(layers)]
    if paper_plan is not None:
        table = size.with_paper(table, size.paper_sizes(paper_plan))
    return size.render(table, fmt, extra)


def _encode(args) -> int:
    from clipq import compressed_model, plan, preflight

    distinct_output(args.output, model=args.model, weights=args.weights, plan=args.plan)
    preflight.check_net(args.model, args.weights, read_data=False)
    layers = compressed_model.encode_file(args.model, args.weights, args.output,
                                          plan.load_plan(args.plan) if args.plan else None, args.huffman)
    print(_size_table(layers, args.format))
    print(f"\n{args.output}: {args.output.stat().st_size:,} bytes")
    return 0


def _decode(args) -> int:
    from clipq import compressed_model, preflight

    distinct_output(args.output, input=args.input, model=args.model)
    if args.model is not None:
        preflight.check_net(args.model)  # Caffe builds it (and opens any LMDB it reads)
    layers = compressed_model.decode_file(args.input, args.output, args.model)
    print(f"{args.output}: {len(layers)} layers" + (f", checked against {args.model}" if args.model else ""))
    return 0


def _size(args) -> int:
    from clipq import compressed_model, plan, preflight

    if args.paper and not args.plan:
        raise ClipqError("--paper compares with the paper_sizes of the --plan file "
                         "(e.g. prototxt/alexnet/paper_params.yaml)")
    if args.input is not None:
        header, layers = compressed_model.read_file(args.input)
        # the header's free-form meta first: it must not replace what this command measured
        extra = {**header.get("meta", {}), "file": str(args.input), "file_bytes": args.input.stat().st_size}
    elif args.model is not None:
        # without weights, Caffe builds the net for its shapes (and opens any LMDB it reads)
        preflight.check_net(args.model, args.weights, read_data=args.weights is None)
        data, layers = compressed_model.encode_model(args.model, args.weights,
                                                     plan.load_plan(args.plan) if args.plan else None,
                                                     args.huffman, args.seed)
        extra = {"prototxt": str(args.model), "weights": str(args.weights) if args.weights else
                 f"random Gaussian (seed {args.seed})", "huffman": args.huffman, "file_bytes": len(data)}
    else:
        raise ClipqError("give a .clipq file, or --model (and --plan for a plain prototxt)")
    print(_size_table(layers, args.format, args.plan if args.paper else None, extra))
    if args.format != "json":
        print(f"\n.clipq file: {extra['file_bytes']:,} bytes (header included)")
    return 0


def _search(args) -> int:
    from clipq import preflight, search

    net = preflight.check_net(args.model, args.weights, "TEST", require_all=False)  # as compress (see its check)
    if args.data is None:  # the subset is drawn from the TRAIN Data layer's LMDB
        preflight.blob_shapes(net.param, args.model, "TRAIN")
    else:
        preflight.first_datum(args.data, "--data")
    plan = search.run(args.model, args.weights, args.out, args.layers, _settings(args), args.jobs, args.data,
                      progress=not args.no_progress, ray=args.ray, batch=args.ray_batch)
    for name, lp in plan.items():
        print(f"{name:<28} p={lp.p:.3f}  b={lp.bits}")
    print(f"{args.out / 'plan.yaml'}; plots in {args.out / 'plots'}")
    return 0


def _settings(args):
    from clipq import search

    if args.initial > args.iterations:
        raise ClipqError(f"--initial {args.initial} is more than --iterations {args.iterations}")
    return search.SearchSettings(lam=args.lam, iterations=args.iterations, initial=args.initial,
                                 subset=args.subset, seed=args.seed, p_max=args.p_max)


def _compress(args) -> int:
    from clipq import pipeline

    from_experiment(args, {"model": "train_val", "weights": "weights", "solver": "clipq_solver", "val": "val_lmdb"},
                    "compress")
    config = pipeline.CompressConfig(args.model, args.weights, args.solver, args.out, args.plan, _settings(args),
                                     args.jobs, args.max_iter, args.huffman, not args.no_progress,
                                     **budget_options(args), **ray_options(args), mpi=args.mpi or 0)
    report = pipeline.run(config, log=lambda msg: print(msg, file=sys.stderr))
    print((args.out / "report.md").read_text())
    return budget_exit(report, args.command)


def from_experiment(args, fields: dict[str, str], out_name: str, optional: tuple[str, ...] = ("val",)) -> None:
    """Fill the options a `clipq init` experiment knows (`fields`: option -> experiment.json key) unless given;
    without --experiment, require them (but `optional`); --out defaults to EXPERIMENT/`out_name`."""
    from clipq import experiment

    known = experiment.read_experiment(args.experiment) if args.experiment else {}
    for option, key in fields.items():
        if getattr(args, option) is None and known.get(key):
            setattr(args, option, Path(known[key]))
    if args.out is None and args.experiment:
        args.out = Path(args.experiment) / out_name
    missing = [f"--{name.replace('_', '-')}" for name in list(fields) + ["out"]
               if getattr(args, name) is None and name not in optional]
    if missing:
        raise ClipqError(f"give {', '.join(missing)} (or --experiment DIR, made by `clipq init`)")
    if args.experiment and not Path(args.weights).exists() and args.weights == Path(known["weights"]):
        raise ClipqError(f"{args.weights}: no baseline yet; train it first: clipq train --solver {known['solver']} "
                         f"--output {known['weights']}")


def budget_options(args) -> dict:
    return {"val": args.val, "search_on": args.search_on, "max_drop": args.max_drop, "rounds": args.rounds,
            "se_margin": args.se_margin}


def ray_options(args) -> dict:
    return {"ray": args.ray, "ray_batch": args.ray_batch}


def budget_exit(report: dict, command: str) -> int:
    """Exit 1, with a plain message, when --max-drop was asked for and no round met it."""
    budget = report.get("budget")
    if budget and not budget["met"]:
        print(f"clipq {command}: no round met --max-drop {budget['max_drop']:g} on the validation data; "
              f"the report keeps round {budget['chosen']} (smallest validation drop). Try more --rounds, a "
              "longer fine-tuning (--max-iter) or a larger budget", file=sys.stderr)
        return 1
    return 0


def _compare(args) -> int:
    from clipq import compare, pipeline

    cc = pipeline.CompressConfig(args.model, args.weights, args.solver, args.out, None, _settings(args), args.jobs,
                                 args.max_iter, args.huffman, not args.no_progress, val=args.val, **ray_options(args))
    config = compare.CompareConfig(cc, tuple(args.targets), args.matched, tuple(args.methods), args.lc_steps)
    compare.run(config, log=lambda msg: print(msg, file=sys.stderr))
    print((args.out / "compare.md").read_text())
    return 0


def _data(args) -> int:
    from clipq import data_import, image_sources

    source = image_sources.load(args.input, args.kind, args.labels, args.label_column, args.shape, args.root)
    settings = data_import.ImportSettings(args.val, args.test, args.seed, tuple(args.resize) if args.resize else None,
                                          args.channels, args.encoded)
    info = data_import.import_images(source, args.out, settings, str(args.input), progress=not args.no_progress)
    splits = ", ".join(f"{name} {s['count']:,}" for name, s in info["splits"].items())
    print(f"{args.out}: {splits} images of {info['channels']}x{info['height']}x{info['width']} "
          f"({'encoded ' + info['encoded'] if info['encoded'] else 'raw'}), {len(info['classes'])} classes; "
          f"{data_import.MEAN_FILE}, {data_import.DATASET_FILE}")
    print(f"next: clipq init --deploy DEPLOY.prototxt --data {args.out} --out EXPERIMENT")
    return 0


def _init(args) -> int:
    from clipq import experiment

    settings = experiment.InitSettings(batch=args.batch, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                       min_iter=args.min_iter, scale=args.scale, mean=args.mean, mirror=args.mirror)
    _, notes = experiment.init(args.deploy, args.data, args.out, settings)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.out}: train_val.prototxt, solver.prototxt, clipq_solver.prototxt, {experiment.EXPERIMENT_FILE}")
    print("next:\n"
          f"  clipq train --solver {args.out / 'solver.prototxt'} --output {args.out / experiment.BASELINE}"
          "   (add --weights ZOO.caffemodel to start from trained weights)\n"
          f"  clipq compress --experiment {args.out} --max-drop 1")
    return 0


def _summary(args) -> int:
    from clipq import summary

    print(summary.table(summary.load_reports(args.runs)))
    return 0


def _reproduce(args) -> int:
    from clipq import paths, reproduce

    out = args.out or paths.cache_root() / "reproduce" / (args.net + ("_smoke" if args.smoke else ""))
    report = reproduce.run(args.net, out, args.imagenet, args.weights, args.smoke, args.paper_plan, args.jobs,
                           not args.no_progress, log=lambda msg: print(msg, file=sys.stderr), **budget_options(args),
                           **ray_options(args))
    print((out / "report.md").read_text())
    return budget_exit(report, args.command)


def _train(args) -> int:
    from clipq import preflight, train

    if args.output is not None:
        distinct_output(args.output, solver=args.solver, weights=args.weights)
    solver = train.read_solver(args.solver)
    net = train.solver_net(args.solver, solver)
    if net is not None:  # weights may cover part of the net: fine-tuning learns the rest
        checked = preflight.check_net(net, args.weights, "TRAIN", require_all=False, what=f"net of {args.solver}")
        if len(solver.test_iter):
            preflight.blob_shapes(checked.param, net, "TEST")
    if args.mpi:
        from clipq import data_parallel

        result = data_parallel.launch(args.mpi, args.solver, output=args.output, weights=args.weights,
                                      log=args.log, progress=not args.no_progress)
    else:
        result = train.train(args.solver, output=args.output, weights=args.weights, log=args.log,
                             progress=not args.no_progress)
    print(result)
    return 0


def _evaluate(args) -> int:
    from clipq import caffe_io, preflight

    preflight.check_net(args.model, args.weights, "TEST")
    scores = caffe_io.evaluate(args.model, args.weights, iterations=args.iterations)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        for name, value in scores.items():
            print(f"{name:<12}{value:.4f}")
    return 0


def _search_arguments(p) -> None:
    """The search options `clipq search` and `clipq compress` share."""
    p.add_argument("--lam", type=nonnegative_float, default=10.0, help="lambda of Eq. 1 (default 10)")
    p.add_argument("--iterations", type=positive_int, default=50,
                   help="evaluations per layer (default 50, as the paper)")
    p.add_argument("--initial", type=positive_int, default=5,
                   help="random evaluations before the GP (default 5; at most --iterations)")
    p.add_argument("--subset", type=positive_int, default=5000,
                   help="training images per evaluation (<= 100, or a multiple of 100)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the subset and of the search (and, in compress, the fine-tuning's random_seed)")
    p.add_argument("--p-max", type=open_fraction, default=0.99, help="largest pruning rate searched (default 0.99)")
    executor_arguments(p)


def executor_arguments(p) -> None:
    """Where the search evaluates (processes or Ray actors), shared by `search`, `compress`, `compare`, `zoo`
    and `reproduce`."""
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="parallel search processes, or Ray workers with --ray (default: cores)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="evaluate on Ray actors: 'local' (a Ray on this machine, 127.0.0.1 only) or a cluster's "
                        "HEAD:PORT (`ray start --head`); the logs resume under either executor")
    p.add_argument("--ray-batch", type=positive_int,
                   help="with --ray: points suggested per layer at a time (default: workers // unfinished layers; "
                        "1 gives the local executor's plan)")


def budget_arguments(p) -> None:
    """Held-out data and the accuracy budget, shared by `compress`, `zoo` and `reproduce`."""
    g = p.add_argument_group("held-out data and the accuracy budget")
    g.add_argument("--val", type=Path, metavar="LMDB",
                   help="validation LMDB the baseline was not trained on: the search's error (see --search-on), "
                        "the --max-drop budget and the fine-tuning's periodic test are measured on it; the "
                        "train_val's TEST data stays for the final numbers only")
    g.add_argument("--search-on", choices=["auto", "val", "train"], default="auto",
                   help="images of the search's error: 'val' (the --val LMDB), 'train' (a random subset of the "
                        "TRAIN LMDB, the paper's choice); default auto = val when --val is given")
    g.add_argument("--max-drop", type=positive_float, metavar="POINTS",
                   help="the smallest model whose decoded caffemodel loses at most POINTS top-1 points on --val: "
                        "bisects the plans the search's evaluations give at every lambda, one fine-tuning per "
                        "round (needs --val; without it, one round at --lam)")
    g.add_argument("--rounds", type=positive_int, default=5,
                   help="at most this many fine-tuning rounds for --max-drop (default 5)")
    g.add_argument("--se-margin", type=nonnegative_float, default=1.0,
                   help="a round meets --max-drop when its validation drop plus this many standard errors of that "
                        "drop is within the budget (default 1; 0 = the drop alone)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="clipq",
        description="CLIP-Q (Tung & Mori, CVPR 2018): in-parallel pruning-quantization of Caffe models, "
                    "fine-tuned inside real Caffe.")
    parser.add_argument("--version", action="version", version=f"clipq {clipq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", help="check the installation: Caffe build, Python packages, BLAS, data",
                       description="Print versions and locations of Caffe (and which source it was built "
                                   "from), numpy, protobuf, GPyOpt, BLAS and the datasets. Exit 1 if "
                                   "something required is missing.")
    p.set_defaults(func=_doctor)

    from clipq.image_sources import KINDS

    p = sub.add_parser("data", help="your labelled images (npy/npz, CSV, IDX, class folders, list file) -> "
                                    "train/val/test LMDBs + mean",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Import labelled images into Caffe Datum LMDBs, as convert_imageset + "
                                   "compute_image_mean do: a seeded split stratified by class into OUT/train_lmdb, "
                                   "val_lmdb (held out: the search and the accuracy budget measure on it) and "
                                   "test_lmdb (the final numbers), the training images' mean in "
                                   "OUT/mean.binaryproto and OUT/dataset.json (shape, classes, counts). Colour "
                                   "images are stored BGR, as Caffe does. OUT must not exist.",
                       epilog="inputs (the kind is guessed from the name; --kind to say it):\n"
                              "  images.npz                     arrays 'images' (or x, X, data) and 'labels' (y, ...)\n"
                              "  images.npy --labels labels.npy (N,H,W), (N,C,H,W) or (N,H,W,C);\n"
                              "                                 uint8, or floats in [0,1]\n"
                              "  digits.csv [--label-column last] one image per row; a header row is skipped\n"
                              "  train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz   (MNIST's IDX)\n"
                              "  photos/                        one subfolder per class (jpg, png, bmp, ...)\n"
                              "  list.txt --root DIR            Caffe's list file: 'relative/path LABEL' per line\n\n"
                              "example:\n  clipq data digits.csv --out cache/data/digits\n"
                              "  clipq data photos/ --out cache/data/photos --resize 256 256 --color --encoded jpg")
    p.add_argument("input", type=Path, help="file or folder of labelled images")
    p.add_argument("--out", type=new_dir, required=True, help="directory to create (refused if it exists)")
    p.add_argument("--kind", choices=KINDS, help="input kind (default: from the name)")
    p.add_argument("--labels", type=Path, help="labels of a .npy or IDX image file")
    p.add_argument("--label-column", choices=["first", "last"], default="first",
                   help="CSV label column (default first)")
    p.add_argument("--shape", type=shape_chw, help="C,H,W of a CSV row (default: a square grey or colour image)")
    p.add_argument("--root", type=Path, help="directory a list file's paths are relative to (default: its own)")
    p.add_argument("--val", type=_fraction_or_zero, default=0.1, help="fraction held out for validation (default 0.1)")
    p.add_argument("--test", type=_fraction_or_zero, default=0.2, help="fraction kept for testing (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--resize", type=positive_int, nargs=2, metavar=("H", "W"), help="resize every image (bilinear)")
    colour = p.add_mutually_exclusive_group()
    colour.add_argument("--gray", dest="channels", action="store_const", const="gray", help="store grey images")
    colour.add_argument("--color", dest="channels", action="store_const", const="color", help="store colour images")
    p.add_argument("--encoded", choices=["png", "jpg"],
                   help="store encoded images (Caffe decodes them; needs Caffe with OpenCV); default raw pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_data, channels="keep")

    p = sub.add_parser("init", help="deploy prototxt + data directory -> train_val, solvers, experiment.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write a runnable experiment for a deploy prototxt on a data directory (made by "
                                   "`clipq data`, or holding Caffe's train_lmdb / val_lmdb / test_lmdb and "
                                   "mean.binaryproto): train_val.prototxt (Data layers with the transform the "
                                   "deploy's input needs, SoftmaxWithLoss, Accuracy top-1 and top-5; the deploy's "
                                   "layer names kept), solver.prototxt (the baseline), clipq_solver.prototxt (the "
                                   "fine-tuning) and experiment.json, with absolute paths. The test batch divides "
                                   "the test set, so test_iter covers it exactly once. OUT must not exist.",
                       epilog="example (a CSV of 28x28 digits to a compressed LeNet-5):\n"
                              "  clipq data digits.csv --out cache/data/digits\n"
                              "  clipq init --deploy prototxt/lenet5/deploy.prototxt --data cache/data/digits "
                              "--out cache/exp/digits\n"
                              "  clipq train --solver cache/exp/digits/solver.prototxt "
                              "--output cache/exp/digits/baseline.caffemodel\n"
                              "  clipq compress --experiment cache/exp/digits --max-drop 1")
    p.add_argument("--deploy", type=Path, required=True, help="deploy prototxt (Input layer or input fields)")
    p.add_argument("--data", type=Path, required=True, help="data directory (see above)")
    p.add_argument("--out", type=new_dir, required=True, help="experiment directory to create")
    p.add_argument("--batch", type=positive_int, default=64, help="training batch (default 64)")
    p.add_argument("--epochs", type=positive_float, default=20.0, help="baseline training epochs (default 20)")
    p.add_argument("--finetune-epochs", type=positive_float, default=5.0, help="fine-tuning epochs (default 5)")
    p.add_argument("--min-iter", type=positive_int, default=1000,
                   help="at least this many iterations, baseline and fine-tuning (default 1000)")
    p.add_argument("--scale", type=positive_float, help="transform_param scale (default: 1/256 for grey images)")
    p.add_argument("--mean", choices=["auto", "file", "none"], default="auto",
                   help="subtract the data's mean.binaryproto (default auto: for colour images)")
    p.add_argument("--mirror", action="store_true", help="random horizontal flips in training")
    p.set_defaults(func=_init)

    p = sub.add_parser("convert", help="plain prototxt + (p, b) plan -> the same net with CLIP-Q layers",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Replace the Convolution / InnerProduct layers named in the plan by CLIP-Q "
                                   "Python layers (same names, blobs, params); everything else is copied.",
                       epilog="plan file (YAML or JSON; layers not listed stay plain):\n"
                              "  version: 1\n  layers:\n    conv1: {p: 0.21, b: 8}\n    fc6:   {p: 0.96, b: 3}\n"
                              "p: pruning rate in [0, 1); b: bits per kept weight, 1..8.\n\n"
                              "Then train with the plugin layers, e.g. starting from plain weights:\n"
                              "  .venv/bin/caffe train --solver SOLVER --weights plain.caffemodel")
    p.add_argument("--model", type=Path, required=True, help="plain train_val or deploy prototxt")
    p.add_argument("--plan", type=Path, required=True, help="per-layer (p, b) file, YAML or JSON")
    p.add_argument("--output", type=output_file, required=True, help="CLIP-Q prototxt to write (replaced if it exists)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("search", help="Bayesian search of each layer's (p, b) (GP + expected improvement)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="For each Convolution / InnerProduct layer, minimise error(p, b) - lambda * c(p, b) "
                                   "(CLIP-Q Eq. 1): error = top-1 error in percent on a random training subset "
                                   "with only that layer pruned-quantized (real Caffe, TEST phase, no fine-tuning); "
                                   "c = the layer's bits saved by the .clipq encoding over all the net's float32 "
                                   "bits. GPyOpt, GP with expected improvement; p in [0, p_max], b continuous in "
                                   "[0.5, 8.5] then rounded.",
                       epilog="Every evaluation is logged in OUT/search/<layer>.jsonl as it finishes; rerunning "
                              "the same command resumes (Ctrl-C loses nothing finished).\n"
                              "Writes OUT/plan.yaml (for `clipq convert`) and OUT/plots/<layer>.png (Fig. 3 style).\n"
                              "The paper used lambda 40 (AlexNet), 5 (GoogLeNet), 10 (ResNet-50), 50 iterations.")
    p.add_argument("--model", type=Path, required=True,
                   help="plain train_val prototxt (TRAIN Data layer, TEST Accuracy)")
    p.add_argument("--weights", type=Path, required=True, help="trained plain caffemodel")
    p.add_argument("--out", type=work_dir, required=True,
                   help="output directory (logs, plan, plots); an existing one is resumed")
    p.add_argument("--layers", nargs="+", help="layers to search (default: every Convolution/InnerProduct layer)")
    _search_arguments(p)
    p.add_argument("--data", help="LMDB to draw the subset from, e.g. held-out validation images (default: the "
                                  "TRAIN Data layer's, as the paper)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_search)

    p = sub.add_parser("compress", help="the whole pipeline: evaluate, search, convert, fine-tune, export, encode, "
                                        "decode, evaluate, report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="CLIP-Q end to end on a trained Caffe model: baseline top-1 on the TEST set -> "
                                   "Bayesian search of (p, b) per layer (or --plan) -> CLIP-Q layers -> fine-tuning "
                                   "with `caffe train` and the given solver (its net and snapshot_prefix are "
                                   "replaced) -> export -> .clipq -> decode -> top-1 of the decoded plain "
                                   "caffemodel with plain Caffe -> OUT/report.md and report.json (layerwise table, "
                                   "accuracies, sizes, stage times, search plots, the net drawn by caffe.draw).",
                       epilog="With --max-drop POINTS and --val LMDB: the smallest model within POINTS top-1 on "
                              "the validation images. Each round fine-tunes one plan of the search's lambda path "
                              "(warm-started from the smallest round that met the budget so far), decodes it and "
                              "measures it on --val; the rounds bisect the path. Rounds live in OUT/rounds/NN/; "
                              "the chosen one is copied to "
                              "OUT/final_model.clipq, final_decoded.caffemodel, final_plan.yaml; report.md has "
                              "every round and plots/budget.png. Exit 1 if no round met the budget.\n\n"
                              "Resumable: each stage is skipped when its outputs exist and its inputs (files, "
                              "settings) did not change; the search and the fine-tuning resume inside their "
                              "stage. Run from the directory the prototxts' relative paths refer to.\n\n"
                              "example (Fashion-MNIST, what `make demo` runs):\n"
                              "  clipq compress --model prototxt/lenet5/train_val.prototxt \\\n"
                              "      --weights cache/models/lenet5_fashion_mnist_55k.caffemodel \\\n"
                              "      --solver solvers/lenet5_clipq_solver.prototxt --out cache/compress/lenet5 \\\n"
                              "      --val cache/data/fashion_mnist/val_lmdb --max-drop 0.5 --lam 1000")
    p.add_argument("--experiment", type=Path, metavar="DIR",
                   help="a `clipq init` directory: its train_val, baseline caffemodel, clipq_solver and validation "
                        "LMDB are the defaults of --model, --weights, --solver and --val, DIR/compress of --out")
    p.add_argument("--model", type=Path, help="plain train_val prototxt (LMDB Data layers, Accuracy)")
    p.add_argument("--weights", type=Path, help="trained plain caffemodel")
    p.add_argument("--solver", type=Path, help="fine-tuning solver prototxt")
    p.add_argument("--out", type=work_dir, help="work and output directory; an existing one is resumed")
    p.add_argument("--plan", type=Path, help="use this (p, b) plan instead of searching")
    p.add_argument("--max-iter", type=positive_int, help="fine-tuning iterations (default: the solver's max_iter)")
    p.add_argument("--huffman", action="store_true", help="Huffman-code the .clipq streams")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--mpi", type=positive_int, metavar="N",
                   help="fine-tune in N MPI processes, gradients averaged: N x the solver's batch per iteration "
                        "(see clipq train --help)")
    _search_arguments(p)
    budget_arguments(p)
    p.set_defaults(func=_compress)

    from clipq.compare import METHODS

    p = sub.add_parser("compare", help="CLIP-Q next to Deep Compression, DNS, LC pruning, the sequential ablation "
                                       "and uniform CLIP-Q: same baseline, solver, iterations and codec",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The paper's comparison (Table 4) on your net: the baseline and the search run "
                                   "as in `clipq compress` (search on --val); CLIP-Q runs at the plans of the "
                                   "search's lambda path nearest --targets; every other method runs at the sizes of "
                                   "CLIP-Q's --matched smallest points (Deep Compression also at its paper's LeNet "
                                   "setting). Every method fine-tunes the solver's max_iter iterations in all (a "
                                   "two-phase method runs the schedule compressed into each half) with real "
                                   "`caffe train`, is stored as a .clipq file, decoded and evaluated on the TEST "
                                   "set. Writes OUT/compare.md, compare.json and plots/compare.png; every run is "
                                   "under OUT/runs/ and resumable.",
                       epilog="example (what `make compare` runs for LeNet-5):\n"
                              "  clipq compare --model prototxt/lenet5/train_val.prototxt \\\n"
                              "      --weights cache/models/lenet5_fashion_mnist_55k.caffemodel \\\n"
                              "      --solver solvers/lenet5_clipq_solver.prototxt --out cache/compare/lenet5 \\\n"
                              "      --val cache/data/fashion_mnist/val_lmdb --lam 1000")
    p.add_argument("--model", type=Path, required=True, help="plain train_val prototxt (LMDB Data layers, Accuracy)")
    p.add_argument("--weights", type=Path, required=True, help="trained plain caffemodel")
    p.add_argument("--solver", type=Path, required=True, help="fine-tuning solver prototxt (every method's)")
    p.add_argument("--out", type=work_dir, required=True, help="work and output directory; an existing one is resumed")
    p.add_argument("--val", type=Path, required=True, metavar="LMDB",
                   help="held-out validation LMDB: the search's error and every fine-tuning's monitor")
    p.add_argument("--targets", type=positive_float, nargs="+", default=[30.0, 60.0, 120.0], metavar="RATE",
                   help="compression rates CLIP-Q's operating points are chosen near (default 30 60 120)")
    p.add_argument("--matched", type=positive_int, default=2,
                   help="the baselines run at the sizes of this many of CLIP-Q's smallest points (default 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to run (default all: {' '.join(METHODS)})")
    p.add_argument("--lc-steps", type=positive_int, default=5, help="LC's L steps (default 5)")
    p.add_argument("--huffman", action="store_true",
                   help="Huffman-code every method's .clipq streams (Deep Compression's third stage; the operating "
                        "points are still placed by the sizes without it)")
    p.add_argument("--max-iter", type=positive_int, help="fine-tuning iterations per method (default: the solver's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _search_arguments(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser("summary", help="several compress runs (e.g. seeds) as one table: mean (min .. max)",
                       description="Read OUT/report.json of each `clipq compress` run and print, per net, the mean "
                                   "and the min-max over the runs of top-1, test and validation drops, .clipq bytes, "
                                   "rate, and how many runs met their --max-drop (Markdown).",
                       epilog="example: clipq summary cache/results/lenet5_seed*  (what `make results` prints)")
    p.add_argument("runs", type=Path, nargs="+", help="`clipq compress` --out directories")
    p.set_defaults(func=_summary)

    p = sub.add_parser("reproduce", help="the paper's AlexNet / GoogLeNet / ResNet-50 experiments (or --smoke)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="`clipq compress` with the paper's setup for NET: prototxt/NET/train_val reading "
                                   "the ImageNet LMDBs, solvers/NET_clipq_solver.prototxt (the paper's schedule), "
                                   "the paper's lambda (AlexNet 40, GoogLeNet 5, ResNet-50 10) and 50 evaluations "
                                   "per layer; reports top-1 / top-5 on the validation LMDB and the layerwise table.",
                       epilog="--smoke: every stage on synthetic data (random images and labels, filler weights, "
                              "batches of 2, 2 evaluations per layer, 2 fine-tuning iterations) to check that the "
                              "real prototxts run end to end on this machine; no accuracy meaning.\n"
                              "Set CLIPQ_DEVICE=gpu:0 with a GPU build of Caffe (solver_mode follows it).")
    p.add_argument("net", choices=["alexnet", "googlenet", "resnet50"])
    p.add_argument("--imagenet", type=Path,
                   help="directory with ilsvrc12_train_lmdb and ilsvrc12_val_lmdb (Caffe's create_imagenet.sh) and, "
                        "if there, imagenet_mean.binaryproto (make_imagenet_mean.sh), used instead of mean values")
    p.add_argument("--weights", type=Path, help="the model-zoo caffemodel to compress")
    p.add_argument("--out", type=work_dir, help="work directory (default: ~/.cache/clipq/reproduce/NET[_smoke])")
    p.add_argument("--smoke", action="store_true", help="synthetic data, minutes on a CPU")
    p.add_argument("--paper-plan", action="store_true", help="use the paper's (p, b) (Tables 1-3) instead of searching")
    executor_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    budget_arguments(p)
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("train", help="run `caffe train` resumably, with a progress bar",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train with the real `caffe train --solver SOLVER`. Resumes from the newest\n"
                                   "<snapshot_prefix>_iter_N.solverstate; Ctrl-C makes Caffe snapshot first.\n"
                                   "Paths inside the solver are relative to the current directory.",
                       epilog="--mpi N: data-parallel training in N pycaffe processes on this machine (mpirun, "
                              "Open MPI): each\nrank reads every N-th image of the LMDB with the solver's batch "
                              "size (N x batch images per\niteration) and the gradients are averaged over the "
                              "ranks every iteration. Snapshots, the log and\nthe result are written by rank 0; "
                              "it resumes like the default path; Ctrl-C makes rank 0 snapshot,\nthen every rank stops "
                              "(under your own mpirun: kill -USR1 <mpirun's pid>).\n"
                              "Several machines: start the ranks with your own mpirun, the paths the same on "
                              "every machine\n(a shared file system):\n"
                              "  mpirun -np 8 --hostfile HOSTS .venv/bin/python -m clipq.data_parallel "
                              "--solver S [--weights W] [--output O]\n"
                              "GPUs (BVLC's NCCL route, one process per GPU): Caffe's python/train.py; untested "
                              "here (no GPU).")
    p.add_argument("--solver", type=Path, required=True, help="solver prototxt")
    p.add_argument("--weights", type=Path, help="caffemodel to start from (ignored when resuming)")
    p.add_argument("--output", type=output_file,
                   help="copy the final caffemodel here (atomically; replaced if it exists)")
    p.add_argument("--log", type=Path, help="Caffe's log (default: <snapshot_prefix>.log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mpi", type=positive_int, metavar="N",
                   help="train in N MPI processes on this machine, gradients averaged (see below)")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="trained CLIP-Q caffemodel -> plain caffemodel with the quantized weights",
                       description="Apply each CLIP-Q layer's final pruning-quantization to its full-precision "
                                   "weights and write a plain caffemodel (layer names kept), loadable with the "
                                   "original plain prototxt.")
    p.add_argument("--model", type=Path, required=True, help="the CLIP-Q prototxt the weights were trained with")
    p.add_argument("--weights", type=Path, required=True, help="trained CLIP-Q caffemodel")
    p.add_argument("--output", type=output_file, required=True,
                   help="plain caffemodel to write (replaced if it exists)")
    p.set_defaults(func=_export)

    p = sub.add_parser("encode", help="caffemodel -> .clipq (relative indices + b-bit codes + codebooks)",
                       description="Write the sparse .clipq file of a model: the layers of a CLIP-Q prototxt (or "
                                   "those of --plan for a plain one) as k-bit relative indices + b-bit codes + "
                                   "a codebook; every other layer raw. Weights that already have <= 2^b - 1 "
                                   "levels (an exported model) are stored exactly; full-precision ones are "
                                   "pruned-quantized first. Prints the layerwise size table.")
    p.add_argument("--model", type=Path, required=True, help="CLIP-Q prototxt, or plain prototxt with --plan")
    p.add_argument("--weights", type=Path, required=True, help="caffemodel (trained CLIP-Q, or exported)")
    p.add_argument("--plan", type=Path, help="(p, b) plan, for a plain prototxt")
    p.add_argument("--output", type=output_file, required=True, help=".clipq file to write (replaced if it exists)")
    p.add_argument("--huffman", action="store_true", help="also Huffman-code the index and code streams")
    p.add_argument("--format", choices=["text", "md", "json"], default="text", help="size table format")
    p.set_defaults(func=_encode)

    p = sub.add_parser("decode", help=".clipq -> plain caffemodel",
                       description="Decode a .clipq file into a plain caffemodel (layer names and types kept). "
                                   "With --model, first check that every learnable layer of that deploy "
                                   "prototxt is in the file with the same blob shapes.")
    p.add_argument("input", type=Path, help=".clipq file")
    p.add_argument("--output", type=output_file, required=True, help="caffemodel to write (replaced if it exists)")
    p.add_argument("--model", type=Path, help="deploy prototxt the caffemodel is for (checked)")
    p.set_defaults(func=_decode)

    p = sub.add_parser("size", help="paper-style layerwise storage table (Layer, p, b, Original, Compressed, Rate)",
                       description="Storage table of a .clipq file, or of a model encoded in memory: "
                                   "--model with --weights, or without --weights random Gaussian weights of the "
                                   "layers' shapes pruned-quantized at each layer's (p, b) -- how to check the "
                                   "paper's storage numbers without ImageNet. Original = float32 weights + biases; "
                                   "Compressed = the layer's real encoded size; KB/MB are 1000-based.")
    p.add_argument("input", type=Path, nargs="?", help=".clipq file (or use --model)")
    p.add_argument("--model", type=Path, help="deploy prototxt (CLIP-Q, or plain with --plan)")
    p.add_argument("--weights", type=Path, help="caffemodel (default: random Gaussian weights)")
    p.add_argument("--plan", type=Path, help="(p, b) plan for a plain prototxt")
    p.add_argument("--huffman", action="store_true", help="Huffman-code the streams (Table 4's bracketed sizes)")
    p.add_argument("--paper", action="store_true", help="add the paper's Compressed column from the plan's paper_sizes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--format", choices=["text", "md", "json"], default="text")
    p.set_defaults(func=_size)

    from clipq import zoo

    p = sub.add_parser("zoo", help=zoo.HELP)
    zoo.add_arguments(p)
    p.set_defaults(func=zoo.run_from_args)

    p = sub.add_parser("evaluate", help="accuracy/loss of a train_val net over its TEST data",
                       description="Run a train_val prototxt in TEST phase with the given weights over its "
                                   "TEST Data layer's LMDB (once through, by default) and print the mean of "
                                   "each scalar output (accuracy, loss).")
    p.add_argument("--model", type=Path, required=True, help="train_val prototxt with a TEST Data layer")
    p.add_argument("--weights", type=Path, required=True, help="caffemodel")
    p.add_argument("--iterations", type=positive_int, help="TEST batches to run (default: the whole LMDB once)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    processes.interrupt_on_termination()  # SIGTERM / SIGHUP end the run as Ctrl-C does, children included
    try:
        return args.func(args)
    except ClipqError as e:
        print(f"clipq {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, ...: the file and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"clipq {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        import lmdb

        if not isinstance(e, lmdb.Error):  # e.g. MapFullError, or a full disk at mdb_txn_commit
            raise
        print(f"clipq {args.command}: LMDB error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
