"""The `clipq` command line: one subcommand per library call, listed in workflow order; each command family
(a module of this package) owns its commands' arguments and handlers."""

from __future__ import annotations

import argparse
import sys

import lmdb

import clipq
from clipq.cli import compress, data, files, setup, train, zoo
from clipq.util import processes
from clipq.util.errors import ClipqError, Interrupted

# Every command in the order of a workflow (`clipq --help` lists them so): set up, bring data, search and
# compress, train by hand, work on model files, a model from the zoo, evaluate.
COMMANDS = (setup.add_doctor, data.add_data, data.add_init, files.add_convert, compress.add_search,
            compress.add_compress, compress.add_compare, compress.add_summary, compress.add_reproduce,
            train.add_train, files.add_export, files.add_encode, files.add_decode, files.add_export_onnx,
            files.add_export_ncnn, files.add_size, zoo.add_zoo, files.add_evaluate)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `clipq <command>: <message>`, like clipq's own (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `clipq` parser with every command of COMMANDS."""
    parser = Parser(
        prog="clipq",
        description="CLIP-Q (Tung & Mori, CVPR 2018): in-parallel pruning-quantization of Caffe models, "
                    "fine-tuned inside real Caffe.")
    parser.add_argument("--version", action="version", version=f"clipq {clipq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors are one line on stderr: exit 2 (bad input, environment), 130 (interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    processes.interrupt_on_termination()  # SIGTERM / SIGHUP end the run as Ctrl-C does, children included
    try:
        return args.func(args)
    except Interrupted as e:  # stopped after saving what it had: the exit code of Ctrl-C, and how to resume
        print(f"clipq {args.command}: {e}", file=sys.stderr)
        return 130
    except ClipqError as e:
        print(f"clipq {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, ...: the file and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"clipq {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except lmdb.Error as e:  # e.g. MapFullError, or a full disk at mdb_txn_commit
        print(f"clipq {args.command}: LMDB error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipq {args.command}: interrupted", file=sys.stderr)
        return 130
