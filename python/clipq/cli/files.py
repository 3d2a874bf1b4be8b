"""The commands on Caffe model files: convert, export, encode, decode, export-onnx, export-ncnn, size, evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipq import plan
from clipq.caffe import caffe_io, convert, preflight
from clipq.cli.arguments import distinct_output, output_file, positive_int
from clipq.storage import size
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model


def add_convert(sub) -> None:
    """`clipq convert`: plain prototxt + plan -> CLIP-Q prototxt"""
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


def _convert(args) -> int:
    distinct_output(args.output, model=args.model, plan=args.plan)
    preflight.net(args.model)
    layers = convert.convert_file(args.model, plan.load_plan(args.plan), args.output)
    print(f"{args.output}: {len(layers)} CLIP-Q layer(s): {', '.join(layers)}")
    return 0


def add_export(sub) -> None:
    """`clipq export`: trained CLIP-Q caffemodel -> plain caffemodel"""
    p = sub.add_parser("export", help="trained CLIP-Q caffemodel -> plain caffemodel with the quantized weights",
                       description="Apply each CLIP-Q layer's final pruning-quantization to its full-precision "
                                   "weights and write a plain caffemodel (layer names kept), loadable with the "
                                   "original plain prototxt.")
    p.add_argument("--model", type=Path, required=True, help="the CLIP-Q prototxt the weights were trained with")
    p.add_argument("--weights", type=Path, required=True, help="trained CLIP-Q caffemodel")
    p.add_argument("--output", type=output_file, required=True,
                   help="plain caffemodel to write (replaced if it exists)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    distinct_output(args.output, model=args.model, weights=args.weights)
    preflight.net(args.model)
    preflight.caffemodel_layers(args.weights)
    summary = convert.export(args.model, args.weights, args.output)
    for name, facts in summary.items():
        print(f"{name:<24} p={facts['p']:<6g} b={facts['bits']}  kept {facts['kept']:.2%}")
    print(f"{args.output}: plain caffemodel with the quantized weights")
    return 0


def add_encode(sub) -> None:
    """`clipq encode`: caffemodel -> .clipq"""
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


def _encode(args) -> int:
    distinct_output(args.output, model=args.model, weights=args.weights, plan=args.plan)
    preflight.check_net(args.model, args.weights, read_data=False)
    layers = compressed_model.encode_file(args.model, args.weights, args.output,
                                          plan.load_plan(args.plan) if args.plan else None, args.huffman)
    print(size_table(layers, args.format))
    print(f"\n{args.output}: {args.output.stat().st_size:,} bytes")
    return 0


def add_decode(sub) -> None:
    """`clipq decode`: .clipq -> caffemodel"""
    p = sub.add_parser("decode", help=".clipq -> plain caffemodel",
                       description="Decode a .clipq file into a plain caffemodel (layer names and types kept). "
                                   "With --model, first check that every learnable layer of that deploy "
                                   "prototxt is in the file with the same blob shapes.")
    p.add_argument("input", type=Path, help=".clipq file")
    p.add_argument("--output", type=output_file, required=True, help="caffemodel to write (replaced if it exists)")
    p.add_argument("--model", type=Path, help="deploy prototxt the caffemodel is for (checked)")
    p.set_defaults(func=_decode)


def _decode(args) -> int:
    distinct_output(args.output, input=args.input, model=args.model)
    if args.model is not None:
        preflight.check_net(args.model)  # Caffe builds it (and opens any LMDB it reads)
    layers = compressed_model.decode_file(args.input, args.output, args.model)
    print(f"{args.output}: {len(layers)} layers" + (f", checked against {args.model}" if args.model else ""))
    return 0


def add_export_onnx(sub) -> None:
    """`clipq export-onnx`: deploy + .clipq (or caffemodel) -> .onnx"""
    p = sub.add_parser("export-onnx", help="deploy prototxt + .clipq (or caffemodel) -> ONNX, compressed layers "
                                           "kept as codes + codebook",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert a deploy net and its weights to an ONNX model (clipq's own\n"
                                   "converter; Caffe's blob names are the ONNX value names). With --clipq, each\n"
                                   "compressed layer is stored as its b-bit codes (uint8; with --opset 21, UINT4 for\n"
                                   "b <= 4) -> Cast -> Gather from its codebook -> the weights of Conv / Gemm: the\n"
                                   "weights `clipq decode` writes, bit for bit. Every other blob is dense float32.\n"
                                   "The model passes onnx.checker's full check before it is written; a layer type\n"
                                   "the converter does not know is refused by name. Prints the file's size against\n"
                                   "the dense export's (docs/onnx.md).",
                       epilog="layer types: Input, Convolution, InnerProduct, Pooling (MAX, AVE, global), ReLU, "
                              "LRN, Softmax,\n  Concat, Eltwise (SUM, PROD, MAX), BatchNorm, Scale, Bias, Dropout, "
                              "Flatten, Reshape, Split,\n  Sigmoid, TanH, Power\n\n"
                              "example:\n  clipq export-onnx --model prototxt/lenet5/deploy.prototxt "
                              "--clipq final_model.clipq --output lenet5.onnx")
    p.add_argument("--model", type=Path, required=True, help="deploy prototxt (with its Input layer)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--clipq", type=Path, help=".clipq file (compressed layers stay codes + codebook)")
    weights.add_argument("--weights", type=Path, help="caffemodel (every layer dense float32)")
    p.add_argument("--output", type=output_file, required=True, help=".onnx file to write (replaced if it exists)")
    p.add_argument("--opset", type=int, choices=[13, 21], default=13,
                   help="ONNX opset (default: 13); 21 stores the codes of layers with b <= 4 as UINT4 "
                        "(onnxruntime runs it; OpenCV does not read UINT4)")
    p.set_defaults(func=_export_onnx)


def _export_onnx(args) -> int:
    distinct_output(args.output, model=args.model, clipq=args.clipq, weights=args.weights)
    written = compressed_model.export_onnx(args.model, args.output, args.clipq, args.weights, args.opset)
    for name, kind in written.compressed.items():
        print(f"{name:<24} codes + codebook ({kind})")
    dense = (f"dense float32 ONNX: {written.dense_bytes:,} bytes ({written.dense_bytes / written.bytes:.1f}x)"
             if written.compressed else "every layer dense float32")
    print(f"{args.output}: {written.bytes:,} bytes, opset {args.opset}, outputs {', '.join(written.outputs)}; {dense}")
    return 0


def add_export_ncnn(sub) -> None:
    """`clipq export-ncnn`: deploy + .clipq (or caffemodel) -> ncnn .param + .bin"""
    p = sub.add_parser("export-ncnn", help="deploy prototxt + .clipq (or caffemodel) -> ncnn .param + .bin, "
                                           "compressed layers as ncnn's 256-entry weight tables",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert a deploy net and its weights to an ncnn model: PREFIX.param (the\n"
                                   "layers; Caffe's blob names) and PREFIX.bin (the weights), both or neither.\n"
                                   "With --clipq, each compressed layer is stored as ncnn's quantized weights: a\n"
                                   "table of 256 float32 values (0, then its codebook) and one uint8 index per\n"
                                   "weight, decoded by ncnn at load into the weights `clipq decode` writes, bit\n"
                                   "for bit. Every other blob is dense float32. A layer type or option ncnn has\n"
                                   "no counterpart for here is refused by name. Prints the .bin's size against\n"
                                   "the dense export's (docs/onnx.md).",
                       epilog="layer types: Input, Convolution (group: ConvolutionDepthWise), InnerProduct "
                              "(axis 1),\n  Pooling (MAX, AVE, global), ReLU, LRN, Softmax, Concat, Eltwise, "
                              "BatchNorm,\n  Scale and Bias (channel axis), Dropout, Split, Flatten, Power, "
                              "Sigmoid, TanH\n\n"
                              "example:\n  clipq export-ncnn --model prototxt/lenet5/deploy.prototxt "
                              "--clipq final_model.clipq --output lenet5\n  (writes lenet5.param and lenet5.bin)")
    p.add_argument("--model", type=Path, required=True, help="deploy prototxt (with its Input layer)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--clipq", type=Path, help=".clipq file (compressed layers stay 256-entry tables + "
                                                    "uint8 indices)")
    weights.add_argument("--weights", type=Path, help="caffemodel (every layer dense float32)")
    p.add_argument("--output", type=output_file, required=True, metavar="PREFIX",
                   help="writes PREFIX.param and PREFIX.bin (replaced if they exist)")
    p.set_defaults(func=_export_ncnn)


def _export_ncnn(args) -> int:
    param, binary = compressed_model.ncnn_paths(args.output)
    for path in (param, binary):
        distinct_output(path, model=args.model, clipq=args.clipq, weights=args.weights)
    written = compressed_model.export_ncnn(args.model, args.output, args.clipq, args.weights)
    for name, bits in written.compressed.items():
        print(f"{name:<24} 256-entry table + uint8 indices (b={bits})")
    dense = (f"dense float32 .bin: {written.dense_bin_bytes:,} bytes "
             f"({written.dense_bin_bytes / written.bin_bytes:.1f}x)" if written.compressed
             else "every layer dense float32")
    print(f"{written.param}: {written.param_bytes:,} bytes; {written.bin}: {written.bin_bytes:,} bytes, outputs "
          f"{', '.join(written.outputs)}; {dense}")
    return 0


def add_size(sub) -> None:
    """`clipq size`: the layerwise storage table"""
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


def _size(args) -> int:
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
    print(size_table(layers, args.format, args.plan if args.paper else None, extra))
    if args.format != "json":
        print(f"\n.clipq file: {extra['file_bytes']:,} bytes (header included)")
    return 0


def add_evaluate(sub) -> None:
    """`clipq evaluate`: top-1 / loss over the TEST data"""
    p = sub.add_parser("evaluate", help="accuracy/loss of a train_val net over its TEST data",
                       description="Run a train_val prototxt in TEST phase with the given weights over its "
                                   "TEST Data layer's LMDB (once through, by default) and print the mean of "
                                   "each scalar output (accuracy, loss).")
    p.add_argument("--model", type=Path, required=True, help="train_val prototxt with a TEST Data layer")
    p.add_argument("--weights", type=Path, required=True, help="caffemodel")
    p.add_argument("--iterations", type=positive_int, help="TEST batches to run (default: the whole LMDB once)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    preflight.check_net(args.model, args.weights, "TEST")
    scores = caffe_io.evaluate(args.model, args.weights, iterations=args.iterations)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        width = max(map(len, scores), default=0) + 2
        for name, value in scores.items():
            print(f"{name:<{width}}{value:.4f}")
    return 0


def size_table(layers, fmt: str, paper_plan=None, extra=None) -> str:
    """The layerwise storage table of `layers` (with the paper's Compressed column from `paper_plan`)."""
    table = size.rows(layers) + [size.overall(layers)]
    if paper_plan is not None:
        table = size.with_paper(table, size.paper_sizes(paper_plan))
    return size.render(table, fmt, extra)
