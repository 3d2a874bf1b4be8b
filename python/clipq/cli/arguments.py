"""The argument types and groups every command family shares, and the options they turn into."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from clipq.data import experiment
from clipq.search.gp import SearchSettings
from clipq.search.subset_eval import METRICS
from clipq.util.errors import ClipqError
from clipq.workflows.pipeline import Aids


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda x: x >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _number(text, float, lambda x: x > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return _number(text, float, lambda x: x >= 0, "a number >= 0")


def fraction_or_zero(text: str) -> float:
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


# The fine-tuning aids of runs with an accuracy budget (measured: docs/pipeline.md, "Choosing the defaults");
# without a budget, the paper's plain fine-tuning.
BUDGET_AIDS = Aids(distill=4.0)
SEED_HELP = "seed of the subset and of the search (and, in compress, the fine-tuning's random_seed)"


def search_arguments(p, seed_help: str = SEED_HELP) -> None:
    """The search's settings and its executor, shared by `search`, `compress`, `compare` and `zoo`."""
    p.add_argument("--lam", type=nonnegative_float, default=10.0, help="lambda of Eq. 1 (default 10)")
    p.add_argument("--iterations", type=positive_int, default=50,
                   help="evaluations per layer (default 50, as the paper)")
    p.add_argument("--initial", type=positive_int, default=5,
                   help="random evaluations before the GP (default 5; at most --iterations)")
    p.add_argument("--subset", type=positive_int, default=5000,
                   help="training images per evaluation (<= 100, or a multiple of 100)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--p-max", type=open_fraction, default=0.99, help="largest pruning rate searched (default 0.99)")
    metric_argument(p)
    executor_arguments(p)


def metric_argument(p) -> None:
    """--search-metric, shared by the commands with a search (`reproduce` too, which has no other option of it)."""
    p.add_argument("--search-metric", choices=METRICS, default="error",
                   help="what the search measures for each (p, b): error (top-1 error %%, the paper's; default), "
                        "loss (100 x the net's loss) or kl (100 x the KL divergence of the net's outputs from the "
                        "uncompressed net's; needs no labels, and ranks points where the error is 0)")


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
    g.add_argument("--rounds", type=positive_int, default=6,
                   help="at most this many fine-tuning rounds for --max-drop (default 6)")
    g.add_argument("--se-margin", type=nonnegative_float, default=1.0,
                   help="a round meets --max-drop when its validation drop plus this many standard errors of that "
                        "drop is within the budget (default 1; 0 = the drop alone)")


def search_settings(args) -> SearchSettings:
    """The search settings of `search_arguments`."""
    if args.initial > args.iterations:
        raise ClipqError(f"--initial {args.initial} is more than --iterations {args.iterations}")
    return SearchSettings(lam=args.lam, iterations=args.iterations, initial=args.initial, subset=args.subset,
                          seed=args.seed, p_max=args.p_max, metric=args.search_metric)


def from_experiment(args, fields: dict[str, str], out_name: str, optional: tuple[str, ...] = ("val",)) -> None:
    """Fill the options a `clipq init` experiment knows (`fields`: option -> experiment.json key) unless given;
    without --experiment, require them (but `optional`); --out defaults to EXPERIMENT/`out_name`."""
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


def finetune_arguments(p, default: str = "with --max-drop: the measured defaults (docs/pipeline.md); else off") -> None:
    """What the fine-tuning adds to the paper's plain fine-tuning, shared by `compress`, `compare`, `zoo` and
    `reproduce`."""
    g = p.add_argument_group(f"fine-tuning aids (default {default})")
    g.add_argument("--finetune-epochs", type=positive_float, metavar="E",
                   help="fine-tune E epochs of the training LMDB (the solver's schedule stretched to them) instead of "
                        f"the solver's max_iter{_budget_default('epochs')}")
    g.add_argument("--ramp", type=fraction_or_zero, metavar="SHARE",
                   help="gradual pruning: each layer's p ramps up (Zhu & Gupta's cubic schedule) over this share of "
                        f"the fine-tuning; 0 = off{_budget_default('ramp')}")
    g.add_argument("--distill", type=nonnegative_float, metavar="T",
                   help="distil from the uncompressed net at temperature T (a frozen copy of it in the Caffe net, a "
                        f"soft-target loss); 0 = off{_budget_default('distill')}")
    g.add_argument("--distill-weight", type=positive_float, metavar="W",
                   help=f"the soft-target loss's weight (the labels' loss keeps 1){_budget_default('distill_weight')}")


def _budget_default(name: str) -> str:
    value = getattr(BUDGET_AIDS, name)
    return f"; with --max-drop {value:g}" if value else ""


def aids(args, budget: bool | None = None) -> Aids:
    """The fine-tuning aids of `finetune_arguments`: each one given, else BUDGET_AIDS' for a run with an
    accuracy budget (`budget`, default: whether --max-drop is given), else off."""
    budget = getattr(args, "max_drop", None) is not None if budget is None else budget
    defaults = BUDGET_AIDS if budget else Aids()
    if getattr(args, "max_iter", None) is not None:
        defaults = replace(defaults, epochs=None)  # --max-iter sets the length
    given = {"epochs": args.finetune_epochs, "ramp": args.ramp, "distill": args.distill,
             "distill_weight": args.distill_weight}
    return replace(defaults, **{name: value for name, value in given.items() if value is not None})


def budget_options(args) -> dict:
    """CompressConfig's fields of `budget_arguments`."""
    return {"val": args.val, "search_on": args.search_on, "max_drop": args.max_drop, "rounds": args.rounds,
            "se_margin": args.se_margin}


def executor_options(args) -> dict:
    """CompressConfig's fields of `executor_arguments`."""
    return {"jobs": args.jobs, "ray": args.ray, "ray_batch": args.ray_batch}


def budget_exit(report: dict, command: str) -> int:
    """Exit 1, with a plain message, when --max-drop was asked for and no round met it."""
    budget = report.get("budget")
    if budget and not budget["met"]:
        print(f"clipq {command}: no round met --max-drop {budget['max_drop']:g} on the validation data; "
              f"the report keeps round {budget['chosen']} (smallest validation drop). Try more --rounds, a "
              "longer fine-tuning (--max-iter) or a larger budget", file=sys.stderr)
        return 1
    return 0
