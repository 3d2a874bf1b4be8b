"""`clipq zoo`: compress a model-zoo model (deploy prototxt + caffemodel) and compare it with the original."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipq.cli.arguments import (
    aids,
    budget_arguments,
    budget_exit,
    budget_options,
    executor_options,
    finetune_arguments,
    from_experiment,
    positive_int,
    search_arguments,
    search_settings,
    work_dir,
)
from clipq.workflows import zoo
from clipq.workflows.pipeline import CompressConfig

DESCRIPTION = """\
Compress a Caffe model as published (e.g. from the Caffe Model Zoo: a deploy prototxt and its
caffemodel) with CLIP-Q's pruning-quantization, and measure what the compression changed.

Old formats (V1 'layers', 'input:'/'input_dim:' fields, V1 caffemodels, legacy 4-D blob shapes) are
first upgraded by Caffe's own upgrade_net_proto_text / upgrade_net_proto_binary into OUT/upgraded/;
your files are only read. (p, b) come from --plan, from --p/--b for every Convolution / InnerProduct
layer, or from --search. Without --solver the trained weights are pruned-quantized as they are (no
fine-tuning); with --solver and --train-val, `clipq compress`'s pipeline fine-tunes them in Caffe
first (under OUT/compress/)."""

EPILOG = """\
comparison (OUT/zoo_report.json and OUT/zoo_report.md):
  The deploy net runs in pycaffe, TEST phase, once with the original caffemodel and once with the
  caffemodel decoded from OUT/model.clipq, on the same inputs: --inputs (already preprocessed, as the
  net's Input layer expects: N x C x H x W; .npz with one array per input blob for multi-input nets), or
  --batch standard-normal random inputs (every input blob filled) when you have no data.
  - top-1 agreement: share of inputs whose argmax over axis 1 of the last output blob (e.g. 'prob') is
    the same for both. Random inputs only show how far the compressed net drifts, not its accuracy,
    and noise often gets one class for every input (the report says so): give real data for that.
  - max / mean absolute difference of that output blob.
  - size: float32 weights (4 bytes per parameter) vs the .clipq file, and the paper-style layer table.
  - ONNX: the compressed model as ONNX next to the .clipq (model.onnx; --no-onnx: none), compressed
    layers as uint8 codes + codebook; onnxruntime runs the same inputs and its top-1 is compared with
    the decoded caffemodel's and the original's (docs/onnx.md).

examples:
  clipq zoo --model deploy.prototxt --weights net.caffemodel --out zoo --list
  clipq zoo --model deploy.prototxt --weights net.caffemodel --out zoo --p 0.5 --b 5
  clipq zoo --model deploy.prototxt --weights net.caffemodel --out zoo --plan plan.yaml --inputs images.npy
  clipq zoo --model deploy.prototxt --weights net.caffemodel --out zoo --search --train-val train_val.prototxt
  clipq zoo ... --plan plan.yaml --train-val train_val.prototxt --solver solver.prototxt --max-iter 2000"""



def add_zoo(sub) -> None:
    """`clipq zoo`: the deploy net, the weights, where (p, b) come from, the search and fine-tuning options it
    shares with `clipq compress`, and the comparison's inputs."""
    p = sub.add_parser("zoo", help="compress any model-zoo deploy prototxt + caffemodel and compare it with the "
                                   "original", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, metavar="DIR",
                   help="a `clipq init` directory: its deploy, baseline caffemodel, train_val, clipq_solver and "
                        "validation LMDB are the defaults of --model, --weights, --train-val, --solver and --val, "
                        "DIR/zoo of --out")
    p.add_argument("--model", type=Path,
                   help="deploy prototxt (Input layer or old input fields; V1 'layers' is upgraded)")
    p.add_argument("--weights", type=Path, help="its trained caffemodel (V1 is upgraded)")
    p.add_argument("--out", type=work_dir,
                   help="work and output directory (upgraded files, plan.yaml, model.clipq, reports); an existing one "
                        "is reused")
    p.add_argument("--list", action="store_true",
                   help="only list the compressible (Convolution / InnerProduct) layers: type, weight shape, "
                        "parameters and share of the net's parameters")
    plan = p.add_argument_group("(p, b): exactly one of --plan, --p/--b, --search")
    plan.add_argument("--plan", type=Path, help="per-layer (p, b) file, YAML or JSON (see `clipq convert --help`)")
    plan.add_argument("--p", type=float, help="pruning rate in [0, 1) for every Convolution / InnerProduct layer")
    plan.add_argument("--b", type=int, help="bits per kept weight, 1..8, for every such layer (with --p)")
    plan.add_argument("--search", action="store_true",
                      help="CLIP-Q's Bayesian search of each layer's (p, b); needs --train-val")
    train = p.add_argument_group("search and fine-tuning")
    train.add_argument("--train-val", type=Path,
                       help="train_val prototxt with LMDB Data layers (TRAIN subset for --search, TEST Accuracy for "
                            "--solver); layer names as in the deploy")
    search_arguments(train, seed_help="seed of the random inputs, of the subset and of the search")
    train.add_argument("--solver", type=Path, help="fine-tune with this solver (needs --train-val); default: no "
                                                   "fine-tuning")
    train.add_argument("--max-iter", type=positive_int, help="fine-tuning iterations (default: the solver's max_iter)")
    compare = p.add_argument_group("comparison")
    compare.add_argument("--inputs", type=Path,
                         help=".npy of preprocessed inputs, N x C x H x W (.npz: one array per input blob); default: "
                              "random standard-normal inputs")
    compare.add_argument("--batch", type=positive_int, default=16,
                         help="inputs per forward pass; without --inputs, the number of random inputs (default 16)")
    budget_arguments(p)
    finetune_arguments(p)
    p.add_argument("--huffman", action="store_true", help="Huffman-code the .clipq streams")
    p.add_argument("--no-onnx", action="store_true",
                   help="do not write the compressed model as ONNX (model.onnx next to model.clipq; docs/onnx.md)")
    p.add_argument("--format", choices=["text", "md", "json"], default="text", help="what to print")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_zoo)


def zoo_config(args: argparse.Namespace) -> zoo.ZooConfig:
    """The ZooConfig of the parsed options (an experiment's files filled in)."""
    from_experiment(args, {"model": "deploy", "weights": "weights", "train_val": "train_val", "solver": "clipq_solver",
                           "val": "val_lmdb"}, "zoo", optional=("train_val", "solver", "val"))
    compress = CompressConfig(args.model, args.weights, args.solver, args.out, args.plan, search_settings(args),
                              max_iter=args.max_iter, huffman=args.huffman, progress=not args.no_progress,
                              aids=aids(args), onnx=not args.no_onnx, **budget_options(args),
                              **executor_options(args))
    return zoo.ZooConfig(compress, train_val=args.train_val, p=args.p, bits=args.b, search=args.search,
                         inputs=args.inputs, batch=args.batch)


def _zoo(args: argparse.Namespace) -> int:
    """Print the layer list (--list) or the comparison report in --format."""
    config = zoo_config(args)
    if args.list:
        print(zoo.render_layers(zoo.list_compressible(config), args.format))
        return 0
    report = zoo.run(config, log=lambda message: print(message, file=sys.stderr))
    render = {"json": lambda r: json.dumps(r, indent=2), "md": zoo.report_markdown, "text": zoo.report_text}
    print(render[args.format](report))
    return budget_exit(report, "zoo")
