"""`clipq data` and `clipq init`: your labelled images into LMDBs, and an experiment for a deploy net on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipq.cli.arguments import fraction_or_zero, new_dir, positive_float, positive_int, shape_chw
from clipq.data import data_import, experiment, image_sources
from clipq.data.image_sources import KINDS
from clipq.util.errors import ClipqError


def add_data(sub) -> None:
    """`clipq data`: labelled images -> train/val/test LMDBs + mean"""
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
    p.add_argument("--val", type=fraction_or_zero, default=0.1, help="fraction held out for validation (default 0.1)")
    p.add_argument("--test", type=fraction_or_zero, default=0.2, help="fraction kept for testing (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--resize", type=positive_int, nargs=2, metavar=("H", "W"), help="resize every image (bilinear)")
    colour = p.add_mutually_exclusive_group()
    colour.add_argument("--gray", dest="channels", action="store_const", const="gray", help="store grey images")
    colour.add_argument("--color", dest="channels", action="store_const", const="color", help="store colour images")
    p.add_argument("--encoded", choices=["png", "jpg"],
                   help="store encoded images (Caffe decodes them; needs Caffe with OpenCV); default raw pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_data, channels="keep")


def _data(args) -> int:
    settings = data_import.ImportSettings(args.val, args.test, args.seed, tuple(args.resize) if args.resize else None,
                                          args.channels, args.encoded)
    data_import.check_settings(settings)  # before the input is read
    if Path(args.input).is_dir() and Path(args.out).resolve().is_relative_to(Path(args.input).resolve()):
        raise ClipqError(f"--out {args.out}: inside the input folder {args.input}, where it would become a class of "
                         "the next import; give a directory outside it")
    source = image_sources.load(args.input, args.kind, args.labels, args.label_column, args.shape, args.root)
    info = data_import.import_images(source, args.out, settings, str(args.input), progress=not args.no_progress)
    splits = ", ".join(f"{name} {s['count']:,}" for name, s in info["splits"].items())
    print(f"{args.out}: {splits} images of {info['channels']}x{info['height']}x{info['width']} "
          f"({'encoded ' + info['encoded'] if info['encoded'] else 'raw'}), {len(info['classes'])} classes; "
          f"{data_import.MEAN_FILE}, {data_import.DATASET_FILE}")
    print(f"next: clipq init --deploy DEPLOY.prototxt --data {args.out} --out EXPERIMENT")
    return 0


def add_init(sub) -> None:
    """`clipq init`: deploy + data directory -> train_val, solvers, experiment.json"""
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


def _init(args) -> int:
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
