"""The CLIP-Q commands: search, compress, compare, summary, reproduce."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipq.caffe import preflight
from clipq.cli.arguments import (
    aids,
    budget_arguments,
    budget_exit,
    budget_options,
    executor_arguments,
    executor_options,
    finetune_arguments,
    from_experiment,
    metric_argument,
    open_fraction,
    positive_float,
    positive_int,
    search_arguments,
    search_settings,
    work_dir,
)
from clipq.methods import METHODS
from clipq.search import driver
from clipq.util import paths
from clipq.workflows import compare, pipeline, reproduce, summary


def add_search(sub) -> None:
    """`clipq search`: the Bayesian (p, b) search"""
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
    search_arguments(p)
    p.add_argument("--data", help="LMDB to draw the subset from, e.g. held-out validation images (default: the "
                                  "TRAIN Data layer's, as the paper)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_search)


def _search(args) -> int:
    net = preflight.check_net(args.model, args.weights, "TEST", require_all=False)  # as compress (see its check)
    if args.data is None:  # the subset is drawn from the TRAIN Data layer's LMDB
        preflight.blob_shapes(net.param, args.model, "TRAIN")
    else:
        preflight.first_datum(args.data, "--data")
    plan = driver.run(args.model, args.weights, args.out, args.layers, search_settings(args), args.jobs, args.data,
                      progress=not args.no_progress, ray=args.ray, batch=args.ray_batch)
    for name, lp in plan.items():
        print(f"{name:<28} p={lp.p:.3f}  b={lp.bits}")
    print(f"{args.out / 'plan.yaml'}; plots in {args.out / 'plots'}")
    return 0


def add_compress(sub) -> None:
    """`clipq compress`: the whole pipeline"""
    p = sub.add_parser("compress", help="the whole pipeline: evaluate, search, convert, fine-tune, export, encode, "
                                        "decode, evaluate, report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="CLIP-Q end to end on a trained Caffe model: baseline top-1 on the TEST set -> "
                                   "Bayesian search of (p, b) per layer (or --plan) -> CLIP-Q layers -> fine-tuning "
                                   "with `caffe train` and the given solver (its net and snapshot_prefix are "
                                   "replaced) -> export -> .clipq -> decode -> top-1 of the decoded plain "
                                   "caffemodel with plain Caffe -> the same model as ONNX next to the .clipq, its test top-1 in "
                                   "onnxruntime checked against Caffe's -> OUT/report.md and report.json (layerwise "
                                   "table, accuracies, sizes, stage times, search plots, the net drawn by caffe.draw).",
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
    p.add_argument("--no-onnx", action="store_true",
                   help="do not write the final model as ONNX (OUT/final_model.onnx, or model.onnx without "
                        "--max-drop; docs/onnx.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--mpi", type=positive_int, metavar="N",
                   help="fine-tune in N MPI processes, gradients averaged: N x the solver's batch per iteration "
                        "(see clipq train --help)")
    search_arguments(p)
    budget_arguments(p)
    finetune_arguments(p)
    p.set_defaults(func=_compress)


def _compress(args) -> int:
    from_experiment(args, {"model": "train_val", "weights": "weights", "solver": "clipq_solver", "val": "val_lmdb"},
                    "compress")
    config = pipeline.CompressConfig(args.model, args.weights, args.solver, args.out, args.plan, search_settings(args),
                                     max_iter=args.max_iter, huffman=args.huffman, progress=not args.no_progress,
                                     mpi=args.mpi or 0, aids=aids(args), onnx=not args.no_onnx,
                                     **budget_options(args), **executor_options(args))
    report = pipeline.run(config, log=lambda msg: print(msg, file=sys.stderr))
    print((args.out / "report.md").read_text())
    return budget_exit(report, args.command)


def add_compare(sub) -> None:
    """`clipq compare`: CLIP-Q and the baselines"""
    p = sub.add_parser("compare", help="CLIP-Q next to Deep Compression, DNS, LC pruning, the sequential ablation "
                                       "and uniform CLIP-Q: same baseline, solver, iterations and codec",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The paper's comparison (Table 4) on your net: the baseline and the search run "
                                   "as in `clipq compress` (search on --val); CLIP-Q runs at the plans of the "
                                   "search's lambda path nearest --targets; every other method runs at the sizes of "
                                   "CLIP-Q's --matched smallest points (Deep Compression also at its paper's LeNet "
                                   "setting). Every method fine-tunes the solver's max_iter iterations in all (a "
                                   "multi-phase method runs the schedule compressed into each phase) with real "
                                   "`caffe train`, after --trials shorter trials of its settings chosen on --val "
                                   "(the same number for every method), is stored as a .clipq file, decoded and "
                                   "evaluated on the TEST set. Writes OUT/compare.md, compare.json and plots/compare.png; every run is "
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
    p.add_argument("--methods", nargs="+", default=list(METHODS.names()), choices=list(METHODS.names()),
                   metavar="METHOD",
                   help=f"methods to run (default all: {' '.join(METHODS.names())})")
    p.add_argument("--lc-steps", type=positive_int,
                   help="LC's L steps in every trial (default: each trial's schedule, 5 to 20 steps)")
    p.add_argument("--trials", type=positive_int, default=4,
                   help="fine-tuned trials per method and operating point, chosen on --val: the method's own settings "
                        "topped up with learning-rate variants (default 4; 1: one run each, no tuning)")
    p.add_argument("--trial-share", type=open_fraction, default=0.25,
                   help="a trial's share of the fine-tuning iterations (default 0.25)")
    p.add_argument("--huffman", action="store_true",
                   help="Huffman-code every method's .clipq streams (Deep Compression's third stage; the operating "
                        "points are still placed by the sizes without it)")
    p.add_argument("--max-iter", type=positive_int, help="fine-tuning iterations per method (default: the solver's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    search_arguments(p)
    finetune_arguments(p, default="off, for every method")
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    cc = pipeline.CompressConfig(args.model, args.weights, args.solver, args.out, None, search_settings(args),
                                 max_iter=args.max_iter, huffman=args.huffman, progress=not args.no_progress,
                                 val=args.val, aids=aids(args, budget=False), **executor_options(args))
    options = {name: {"steps": args.lc_steps} for name in ("lc", "lc-quantized")} if args.lc_steps else {}
    config = compare.CompareConfig(cc, tuple(args.targets), args.matched, tuple(args.methods), options,
                                   args.trials, args.trial_share)
    compare.run(config, log=lambda msg: print(msg, file=sys.stderr))
    print((args.out / "compare.md").read_text())
    return 0


def add_summary(sub) -> None:
    """`clipq summary`: several runs as one table"""
    p = sub.add_parser("summary", help="several compress runs (e.g. seeds) as one table: mean (min .. max)",
                       description="Read OUT/report.json of each `clipq compress` run and print, per net, the mean "
                                   "and the min-max over the runs of top-1, test and validation drops, .clipq bytes, "
                                   "rate, and how many runs met their --max-drop (Markdown).",
                       epilog="example: clipq summary cache/results/lenet5_seed*  (what `make results` prints)")
    p.add_argument("runs", type=Path, nargs="+", help="`clipq compress` --out directories")
    p.set_defaults(func=_summary)


def _summary(args) -> int:
    print(summary.table(summary.load_reports(args.runs)))
    return 0


def add_reproduce(sub) -> None:
    """`clipq reproduce`: the paper's experiments"""
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
    metric_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    budget_arguments(p)
    finetune_arguments(p, default="off: the paper's plain fine-tuning")
    p.set_defaults(func=_reproduce)


def _reproduce(args) -> int:
    out = args.out or paths.cache_root() / "reproduce" / (args.net + ("_smoke" if args.smoke else ""))
    report = reproduce.run(args.net, out, args.imagenet, args.weights, args.smoke, args.paper_plan, args.jobs,
                           not args.no_progress, log=lambda msg: print(msg, file=sys.stderr),
                           metric=args.search_metric, aids=aids(args, budget=False),
                           **budget_options(args), ray=args.ray, ray_batch=args.ray_batch)
    print((out / "report.md").read_text())
    return budget_exit(report, args.command)
