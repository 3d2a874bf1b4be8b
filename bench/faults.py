#!/usr/bin/env python3
"""Fault table: damaged `.clipq` files and bad inputs through the real `clipq` CLI, counted by outcome.

Every case runs `.venv/bin/clipq ...` as a subprocess from the repository root, writing into its own
temporary directory, and gets one outcome:
  refused clearly     exit 2; stderr is one line `clipq <command>: ...`; no traceback, no Caffe stack
  traceback or abort  a Python traceback, a glog `Check failed` or `***` stack, or death by a signal
  accepted wrongly    exit 0 on bad input, or still running after the timeout (for a `.clipq` file: a
                      decoded caffemodel that differs from the original's)
  identical           exit 0 on a `.clipq` that decodes to the original's caffemodel byte for byte (fine)
  other               any other exit, or a refusal of several lines
and `files left` counts the cases, among those not accepted, whose directory gained or changed a file
(an output, or a temporary). `.clipq` cases decode damaged copies of a LeNet-5 file that `clipq encode`
made from random weights: seeded bit flips (half in the fixed part and header), truncations, appended
bytes, and header edits with the header CRC recomputed. CLI cases are the kinds of issue 12 (items 1-3, 9);
"hostile" cases those of issue 22 (a user's file under --out, bombs and lying headers in inputs under 1 MB,
deploys Caffe aborts on, silently wrong plans, an unreachable --ray). "peak MB": the largest resident memory
of one case's clipq process.
Interrupted and concurrent runs (kills of search / compress, two runs on one --out) are not in this table.

    .venv/bin/python bench/faults.py [--quick] [--jobs 2] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io
from clipq.data import datasets
from clipq.storage import sparse_codec

REPO = Path(__file__).resolve().parents[1]
CLIPQ = REPO / ".venv" / "bin" / "clipq"
LENET5 = REPO / "prototxt" / "lenet5"
LENET300 = REPO / "prototxt" / "lenet300_100" / "deploy.prototxt"
DEPLOY, TRAIN_VAL, PLAN = LENET5 / "deploy.prototxt", LENET5 / "train_val.prototxt", LENET5 / "example_plan.yaml"
TIMEOUT = 120  # seconds; a bad input still running by then was accepted
OUTCOMES = ["refused clearly", "traceback or abort", "accepted wrongly", "identical", "other"]


@dataclass
class Case:
    """One `clipq` invocation; "{out}" in its arguments is the case's own (empty) directory."""

    category: str
    name: str
    argv: list[str]
    copies: dict[str, str] | None = None  # files copied into {out} first: name -> source
    reference: Path | None = None  # for a .clipq: the original's decoded caffemodel ({out}/d.caffemodel)


@dataclass
class Result:
    case: Case
    outcome: str
    files_left: bool
    first_line: str
    peak_mb: float  # the clipq process's peak resident memory


# --- inputs ------------------------------------------------------------------------------------

def random_weights(deploy: Path, path: Path) -> None:
    """Save `deploy` with Gaussian random weights (as tests/conftest.py's random_caffemodel)."""
    cf = caffe_io.caffe()
    net = cf.Net(str(deploy), cf.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)
    net.save(str(path))


def make_inputs(root: Path) -> dict[str, str]:
    """Good and bad input files for the CLI cases, by name; the LMDB paths made absolute."""
    root.mkdir()
    files = {"deploy": DEPLOY, "train_val": root / "train_val.prototxt", "plan": PLAN}
    absolute = re.sub(r'source: "(?=cache/)', f'source: "{REPO}/', TRAIN_VAL.read_text())
    files["train_val"].write_text(absolute)
    texts = {
        "empty.caffemodel": "", "text.caffemodel": "these are not weights\n", "empty.prototxt": "",
        "malformed.prototxt": 'name: "x"\nlayer { name: "data" type: "Input" top: "data" \n',
        "unknown_bottom.prototxt": absolute.replace('bottom: "pool1"', 'bottom: "nothing"'),
        "unknown_bottom_deploy.prototxt": DEPLOY.read_text().replace('bottom: "pool1"', 'bottom: "nothing"'),
        "deploy_8x8.prototxt": DEPLOY.read_text().replace("dim: 28", "dim: 8"),
        "missing_lmdb.prototxt": re.sub(r'source: "[^"]*"', 'source: "/nonexistent/lmdb"', absolute),
        "missing_train_lmdb.prototxt": absolute.replace(f'"{REPO}/cache/data/fashion_mnist/train_lmdb"',
                                                        '"/nonexistent/train_lmdb"', 1),
        "lmdb_8x8.prototxt": re.sub(r'source: "[^"]*"', f'source: "{root}/lmdb_8x8"', absolute),
        "bad_plan.yaml": "version: 1\nlayers:\n  ip1: {p: 1.5, b: 3}\n",
        "clipq_train_val.prototxt": re.sub(r'source: "(?=cache/)', f'source: "{REPO}/',
                                           (LENET5 / "clipq_train_val.prototxt").read_text()),
        "not_an_lmdb": "plain text\n",
    }
    for name, text in texts.items():
        (root / name).write_text(text)
        files[name] = root / name
    solver = ("test_iter: 1\ntest_interval: 1000\nbase_lr: 0.001\nlr_policy: \"fixed\"\nmax_iter: 1\n"
              f"snapshot_prefix: \"{root}/snap/s\"\nsolver_mode: CPU\n")
    files["solver"] = root / "solver.prototxt"
    files["solver"].write_text(f'net: "{root}/clipq_train_val.prototxt"\n' + solver)
    files["relative_solver"] = root / "relative_solver.prototxt"  # net relative to the solver, not to the cwd
    files["relative_solver"].write_text('net: "clipq_train_val.prototxt"\n' + solver)
    files["unknown_bottom_solver"] = root / "unknown_bottom_solver.prototxt"
    files["unknown_bottom_solver"].write_text(f'net: "{root}/unknown_bottom.prototxt"\n' + solver)
    files["weights"], files["other_weights"] = root / "w.caffemodel", root / "lenet300.caffemodel"
    random_weights(DEPLOY, files["weights"])
    random_weights(LENET300, files["other_weights"])
    datasets.write_lmdb(datasets.Split(np.zeros((64, 8, 8), np.uint8), np.zeros(64, np.int64)), root / "lmdb_8x8")
    files["truncated.caffemodel"] = root / "truncated.caffemodel"
    whole = files["weights"].read_bytes()
    files["truncated.caffemodel"].write_bytes(whole[:len(whole) // 2])
    files["clipq"], files["reference"] = root / "m.clipq", root / "reference.caffemodel"
    subprocess.run([CLIPQ, "encode", "--model", DEPLOY, "--weights", files["weights"], "--plan", PLAN,
                    "--output", files["clipq"]], cwd=REPO, check=True, capture_output=True)
    subprocess.run([CLIPQ, "decode", files["clipq"], "--output", files["reference"]], cwd=REPO, check=True,
                   capture_output=True)
    files["truncated.clipq"] = root / "truncated.clipq"
    files["truncated.clipq"].write_bytes(files["clipq"].read_bytes()[:-100])
    return {name: str(path) for name, path in files.items()}


# --- damaged .clipq files ----------------------------------------------------------------------

def _layer(name):
    return lambda header: next(entry for entry in header["layers"] if entry["name"] == name)


IP1, IP2 = _layer("ip1"), _layer("ip2")

# Header edits that change what the file says (none is harmless); the CRC is recomputed after each.
EDITS = {
    "transposed shape": lambda h: IP1(h)["shapes"].__setitem__(0, [800, 500]),
    "shape [500, 801]": lambda h: IP1(h)["shapes"].__setitem__(0, [500, 801]),
    "renamed layer": lambda h: IP1(h).update(name="ip3"),
    "removed first layer": lambda h: h["layers"].pop(0),
    "removed last layer": lambda h: h["layers"].pop(),
    "duplicated layer": lambda h: h["layers"].append(dict(IP2(h))),
    "changed type": lambda h: IP1(h).update(type="Convolution"),
    "unknown type": lambda h: IP1(h).update(type="Normalize"),
    "layers=[]": lambda h: h.update(layers=[]),
    "layers=null": lambda h: h.update(layers=None),
    "no crc32": lambda h: IP1(h).pop("crc32"),
    "float bits": lambda h: IP1(h).update(bits=3.0),
    "float offset": lambda h: IP2(h).update(offset=float(IP2(h)["offset"])),
    "bits 9": lambda h: IP1(h).update(bits=9),
    "k 0": lambda h: IP1(h).update(k=0),
    "more entries": lambda h: IP1(h).update(entries=IP1(h)["entries"] + 100),
    "resized bias": lambda h: IP1(h)["shapes"].__setitem__(1, [499]),
    "negative dimension": lambda h: IP1(h)["shapes"].__setitem__(0, [-500, -800]),
    "swapped layers": lambda h: h["layers"].reverse(),
    "p 1.5": lambda h: IP1(h).update(p=1.5),
    "name with a newline": lambda h: IP1(h).update(name="ip\n1"),
    "huffman flag": lambda h: h.update(huffman=True),
    "codebook into bias": lambda h: IP2(h)["stream_bytes"].__setitem__(2, IP2(h)["stream_bytes"][2] - 4),
    "json version 1": lambda h: h.update(version=1),
}


def damaged_files(data: bytes, quick: bool) -> list[tuple[str, str, bytes]]:
    """(category, name, bytes) of the damaged copies of a `.clipq` file."""
    rng = np.random.default_rng(0)
    header, head = sparse_codec.read_header(data)  # head: bytes of the fixed part + header
    flips = 20 if quick else 64
    bits = np.concatenate([rng.choice(head * 8, flips // 2, replace=False),
                           rng.choice(np.arange(head * 8, len(data) * 8), flips - flips // 2, replace=False)])
    out = []
    for bit in bits:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        out.append(("clipq: bit flips", f"bit {bit}", bytes(flipped)))
    ends = sorted({head + e["offset"] + d for e in header["layers"] for d in (0, 1, e["length"] - 1)})
    lengths = [0, 1, 7, 8, 12, 16, 19, 20, head // 2, head - 1] + ends + [len(data) - 1]
    lengths = sorted(set(lengths))[::3 if quick else 1]
    out += [("clipq: truncations", f"{n} bytes", data[:n]) for n in lengths]
    extras = {"a newline": b"\n", "16 random bytes": rng.bytes(16), "4096 zeros": bytes(4096), "the file again": data}
    out += [("clipq: appended bytes", name, data + extra) for name, extra in list(extras.items())[:2 if quick else 4]]
    for name, edit in list(EDITS.items())[::3 if quick else 1]:
        edited = sparse_codec.read_header(data)[0]
        edit(edited)
        out.append(("clipq: header edits, CRC redone", name, sparse_codec.replace_header(data, edited)))
    downgraded = sparse_codec.read_header(data)[0]
    downgraded["version"] = 1
    out.append(("clipq: header edits, CRC redone", "version 1",
                sparse_codec.replace_header(data, downgraded, version=1)))
    return out


def clipq_cases(inputs: dict[str, str], root: Path, quick: bool) -> list[Case]:
    """`clipq decode` of each damaged copy (written under `root`)."""
    root.mkdir()
    cases = []
    for i, (category, name, data) in enumerate(damaged_files(Path(inputs["clipq"]).read_bytes(), quick)):
        path = root / f"{i:03d}.clipq"
        path.write_bytes(data)
        cases.append(Case(category, name, ["decode", str(path), "--output", "{out}/d.caffemodel"],
                          reference=Path(inputs["reference"])))
    return cases


# --- bad CLI inputs ----------------------------------------------------------------------------

def cli_cases(f: dict[str, str]) -> list[Case]:
    """Bad invocations of every command that reads inputs (issue 12, items 1-3 and 9)."""
    enc = ["encode", "--model", f["deploy"], "--plan", f["plan"]]
    ev = ["evaluate", "--model", f["train_val"], "--iterations", "2"]
    fast = ["--iterations", "2", "--initial", "1", "--subset", "100", "--jobs", "1", "--no-progress"]
    search = ["search", "--model", f["train_val"], "--layers", "ip2", *fast]
    comp = ["compress", "--model", f["train_val"], "--solver", f["solver"], "--max-iter", "1", *fast]
    train = ["train", "--no-progress"]
    cmp = ["compare", "--model", f["train_val"], "--solver", f["solver"], "--max-iter", "1", *fast]
    val = str(REPO / "cache" / "data" / "fashion_mnist" / "val_lmdb")
    existing = {"exists.txt": f["not_an_lmdb"]}  # an existing file given as --out
    table = {
        "encode": [
            ("empty caffemodel", enc + ["--weights", f["empty.caffemodel"], "--output", "{out}/m.clipq"]),
            ("text caffemodel", enc + ["--weights", f["text.caffemodel"], "--output", "{out}/m.clipq"]),
            ("another net's weights", enc + ["--weights", f["other_weights"], "--output", "{out}/m.clipq"]),
            ("truncated caffemodel", enc + ["--weights", f["truncated.caffemodel"], "--output", "{out}/m.clipq"]),
            ("missing weights", enc + ["--weights", "{out}/none.caffemodel", "--output", "{out}/m.clipq"]),
            ("missing plan", ["encode", "--model", f["deploy"], "--plan", "{out}/none.yaml", "--weights",
                              f["weights"], "--output", "{out}/m.clipq"]),
            ("malformed prototxt", ["encode", "--model", f["malformed.prototxt"], "--plan", f["plan"],
                                    "--weights", f["weights"], "--output", "{out}/m.clipq"]),
            ("directory as --output", enc + ["--weights", f["weights"], "--output", "{out}"]),
            ("--output is the --weights file", enc + ["--weights", "{out}/w.caffemodel", "--output",
                                                      "{out}/w.caffemodel"], {"w.caffemodel": f["weights"]}),
        ],
        "decode": [
            ("missing file", ["decode", "{out}/none.clipq", "--output", "{out}/d.caffemodel"]),
            ("directory as input", ["decode", "{out}", "--output", "{out}/d.caffemodel"]),
            ("caffemodel as input", ["decode", f["weights"], "--output", "{out}/d.caffemodel"]),
            ("directory as --output", ["decode", f["clipq"], "--output", "{out}"]),
            ("malformed --model", ["decode", f["clipq"], "--output", "{out}/d.caffemodel", "--model",
                                   f["malformed.prototxt"]]),
            ("empty --model", ["decode", f["clipq"], "--output", "{out}/d.caffemodel", "--model",
                               f["empty.prototxt"]]),
            ("8x8 input --model", ["decode", f["clipq"], "--output", "{out}/d.caffemodel", "--model",
                                   f["deploy_8x8.prototxt"]]),
            ("unknown bottom blob --model", ["decode", f["clipq"], "--output", "{out}/d.caffemodel", "--model",
                                             f["unknown_bottom_deploy.prototxt"]]),
            ("another net --model", ["decode", f["clipq"], "--output", "{out}/d.caffemodel", "--model", LENET300]),
            ("--output is the input", ["decode", "{out}/m.clipq", "--output", "{out}/m.clipq"],
             {"m.clipq": f["clipq"]}),
        ],
        "evaluate": [
            ("empty caffemodel", ev + ["--weights", f["empty.caffemodel"]]),
            ("text caffemodel", ev + ["--weights", f["text.caffemodel"]]),
            ("another net's weights", ev + ["--weights", f["other_weights"]]),
            ("truncated caffemodel", ev + ["--weights", f["truncated.caffemodel"]]),
            ("missing weights", ev + ["--weights", "{out}/none.caffemodel"]),
            ("malformed prototxt", ["evaluate", "--model", f["malformed.prototxt"], "--weights", f["weights"]]),
            ("empty prototxt", ["evaluate", "--model", f["empty.prototxt"], "--weights", f["weights"]]),
            ("unknown bottom blob", ["evaluate", "--model", f["unknown_bottom.prototxt"], "--weights", f["weights"]]),
            ("missing LMDB", ["evaluate", "--model", f["missing_lmdb.prototxt"], "--weights", f["weights"]]),
            ("8x8 images", ["evaluate", "--model", f["lmdb_8x8.prototxt"], "--weights", f["weights"]]),
            ("--iterations 0", ["evaluate", "--model", f["train_val"], "--weights", f["weights"], "--iterations", "0"]),
            ("--iterations -3", ["evaluate", "--model", f["train_val"], "--weights", f["weights"],
                                 "--iterations", "-3"]),
        ],
        "convert": [
            ("missing plan", ["convert", "--model", f["deploy"], "--plan", "{out}/none.yaml", "--output",
                              "{out}/c.prototxt"]),
            ("plan with p 1.5", ["convert", "--model", f["deploy"], "--plan", f["bad_plan.yaml"], "--output",
                                 "{out}/c.prototxt"]),
            ("malformed prototxt", ["convert", "--model", f["malformed.prototxt"], "--plan", f["plan"], "--output",
                                    "{out}/c.prototxt"]),
            ("directory as --output", ["convert", "--model", f["deploy"], "--plan", f["plan"], "--output", "{out}"]),
            ("empty prototxt", ["convert", "--model", f["empty.prototxt"], "--plan", f["plan"], "--output",
                                "{out}/c.prototxt"]),
        ],
        "export": [
            ("empty caffemodel", ["export", "--model", f["clipq_train_val.prototxt"], "--weights",
                                  f["empty.caffemodel"], "--output", "{out}/e.caffemodel"]),
            ("directory as --output", ["export", "--model", f["clipq_train_val.prototxt"], "--weights",
                                       f["weights"], "--output", "{out}"]),
            ("another net's weights", ["export", "--model", f["clipq_train_val.prototxt"], "--weights",
                                       f["other_weights"], "--output", "{out}/e.caffemodel"]),
        ],
        "search": [
            ("empty caffemodel", search + ["--weights", f["empty.caffemodel"], "--out", "{out}/s"]),
            ("missing weights", search + ["--weights", "{out}/none.caffemodel", "--out", "{out}/s"]),
            ("another net's weights", search + ["--weights", f["other_weights"], "--out", "{out}/s"]),
            ("missing training LMDB", ["search", "--model", f["missing_train_lmdb.prototxt"], "--layers", "ip2",
                                       *fast, "--weights", f["weights"], "--out", "{out}/s"]),
            ("existing file as --out", search + ["--weights", f["weights"], "--out", "{out}/exists.txt"], existing),
            ("--iterations 0", search + ["--weights", f["weights"], "--out", "{out}/s", "--iterations", "0"]),
            ("--iterations -3", search + ["--weights", f["weights"], "--out", "{out}/s", "--iterations", "-3"]),
            ("--jobs 0", search + ["--weights", f["weights"], "--out", "{out}/s", "--jobs", "0"]),
            ("--p-max 1.5", search + ["--weights", f["weights"], "--out", "{out}/s", "--p-max", "1.5"]),
            ("--initial 0", search + ["--weights", f["weights"], "--out", "{out}/s", "--initial", "0"]),
            ("--lam -5", search + ["--weights", f["weights"], "--out", "{out}/s", "--lam", "-5"]),
            ("missing --data LMDB", search + ["--weights", f["weights"], "--out", "{out}/s", "--data",
                                              "{out}/no_lmdb"]),
        ],
        "compress": [
            ("empty caffemodel", comp + ["--weights", f["empty.caffemodel"], "--plan", f["plan"], "--out", "{out}/c"]),
            ("another net's weights", comp + ["--weights", f["other_weights"], "--plan", f["plan"],
                                              "--out", "{out}/c"]),
            ("missing training LMDB", ["compress", "--model", f["missing_train_lmdb.prototxt"], "--solver",
                                       f["solver"], "--weights", f["weights"], "--plan", f["plan"], "--out",
                                       "{out}/c", *fast]),
            ("missing --plan", comp + ["--weights", f["weights"], "--plan", "{out}/none.yaml", "--out", "{out}/c"]),
            ("plan with p 1.5", comp + ["--weights", f["weights"], "--plan", f["bad_plan.yaml"], "--out", "{out}/c"]),
            ("missing solver", ["compress", "--model", f["train_val"], "--solver", "{out}/none.prototxt",
                                "--weights", f["weights"], "--plan", f["plan"], "--out", "{out}/c"]),
            ("missing LMDB", ["compress", "--model", f["missing_lmdb.prototxt"], "--solver", f["solver"],
                              "--weights", f["weights"], "--plan", f["plan"], "--out", "{out}/c", *fast]),
            ("8x8 images", ["compress", "--model", f["lmdb_8x8.prototxt"], "--solver", f["solver"],
                            "--weights", f["weights"], "--plan", f["plan"], "--out", "{out}/c", *fast]),
            ("missing --val LMDB", comp + ["--weights", f["weights"], "--plan", f["plan"], "--out", "{out}/c",
                                           "--val", "{out}/no_lmdb"]),
            ("text file as --val", comp + ["--weights", f["weights"], "--plan", f["plan"], "--out", "{out}/c",
                                           "--val", f["not_an_lmdb"]]),
            ("existing file as --out", comp + ["--weights", f["weights"], "--plan", f["plan"],
                                               "--out", "{out}/exists.txt"], existing),
            ("--lam -5", comp + ["--weights", f["weights"], "--out", "{out}/c", "--lam", "-5"]),
        ],
        "compare": [
            ("empty caffemodel", cmp + ["--weights", f["empty.caffemodel"], "--val", val, "--out", "{out}/c"]),
            ("another net's weights", cmp + ["--weights", f["other_weights"], "--val", val, "--out", "{out}/c"]),
            ("no --val", cmp + ["--weights", f["weights"], "--out", "{out}/c"]),
            ("missing --val LMDB", cmp + ["--weights", f["weights"], "--val", "{out}/no_lmdb", "--out", "{out}/c"]),
            ("text file as --val", cmp + ["--weights", f["weights"], "--val", f["not_an_lmdb"], "--out", "{out}/c"]),
            ("--targets 0.5", cmp + ["--weights", f["weights"], "--val", val, "--out", "{out}/c", "--targets", "0.5"]),
            ("--methods without clipq", cmp + ["--weights", f["weights"], "--val", val, "--out", "{out}/c",
                                               "--methods", "dns"]),
            ("existing file as --out", cmp + ["--weights", f["weights"], "--val", val, "--out", "{out}/exists.txt"],
             existing),
        ],
        "train": [
            ("missing solver", train + ["--solver", "{out}/none.prototxt"]),
            ("malformed solver", train + ["--solver", f["malformed.prototxt"]]),
            ("net relative to the solver", train + ["--solver", f["relative_solver"]]),
            ("net with an unknown bottom", train + ["--solver", f["unknown_bottom_solver"]]),
            ("empty caffemodel", train + ["--solver", f["solver"], "--weights", f["empty.caffemodel"]]),
            ("directory as --output", train + ["--solver", f["solver"], "--weights", f["weights"], "--output",
                                               "{out}"]),
        ],
        "zoo": [
            ("empty caffemodel", ["zoo", "--model", f["deploy"], "--plan", f["plan"], "--weights",
                                  f["empty.caffemodel"], "--out", "{out}/z", "--no-progress"]),
            ("existing file as --out", ["zoo", "--model", f["deploy"], "--plan", f["plan"], "--weights",
                                        f["weights"], "--out", "{out}/exists.txt", "--no-progress"], existing),
            ("--p 1.5", ["zoo", "--model", f["deploy"], "--p", "1.5", "--b", "3", "--weights", f["weights"],
                         "--out", "{out}/z", "--no-progress"]),
        ],
        "size": [
            ("missing .clipq", ["size", "{out}/none.clipq"]),
            ("truncated .clipq", ["size", f["truncated.clipq"]]),
            ("8x8 input --model", ["size", "--model", f["deploy_8x8.prototxt"], "--plan", f["plan"]]),
            ("malformed --model", ["size", "--model", f["malformed.prototxt"], "--plan", f["plan"]]),
        ],
        "summary": [("missing run directory", ["summary", "{out}/no_run"])],
        "reproduce": [("missing ImageNet directory", ["reproduce", "alexnet", "--imagenet", "{out}/no_imagenet",
                                                      "--weights", f["weights"], "--out", "{out}/r", "--no-progress"])],
    }
    return [Case(f"cli: {command}", name, [str(a) for a in argv], *copies)
            for command, rows in table.items() for name, argv, *copies in rows]


# --- hostile inputs (issue 22) ----------------------------------------------------------------------

def hostile_inputs(root: Path, f: dict[str, str]) -> dict[str, str]:
    """Small files (all under 1 MB) made to hurt: bombs, lies in headers, names Caffe aborts on."""
    root.mkdir()
    texts = {
        "label_1.5.csv": "label,p0,p1,p2,p3\n0,1,2,3,4\n1.5,1,2,3,4\n",
        "label_nan.csv": "label,p0,p1,p2,p3\n0,1,2,3,4\nnan,1,2,3,4\n",
        "label_huge.csv": "label,p0,p1,p2,p3\n0,1,2,3,4\n1000000000000000000,1,2,3,4\n",
        "binary.csv": "\x00\x80\xff" * 1000,
        "list_1e3.txt": "a.png 1e3\n",
        "bomb_plan.yaml": "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                          "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                          "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
        "duplicate_plan.yaml": "layers:\n  ip1: {p: 0.5, b: 3}\n  ip1: {p: 0.9, b: 1}\n",
        "deep_plan.yaml": "[" * 3000 + "]" * 3000,
        "loss_layer.prototxt": DEPLOY.read_text().replace('name: "ip2"', 'name: "loss"'),
        "label_blob.prototxt": DEPLOY.read_text().replace('top: "ip2"', 'top: "label"').replace(
            'bottom: "ip2"', 'bottom: "label"'),
        "argmax.prototxt": DEPLOY.read_text() + 'layer { name: "arg" type: "ArgMax" bottom: "prob" top: "arg" }\n',
        "input_only.prototxt": 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 '
                               'dim: 28 dim: 28 } } }\n',
        "input_softmax.prototxt": 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                                  'dim: 1 dim: 28 dim: 28 } } }\nlayer { name: "prob" type: "Softmax" bottom: "data" '
                                  'top: "prob" }\n',
        "shared.prototxt": 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 8 } } }\n'
                           'layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } '
                           'inner_product_param { num_output: 8 } }\n'
                           'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } '
                           'inner_product_param { num_output: 8 } }\n',
        "shared_plan.yaml": "layers:\n  a: {p: 0.5, b: 8}\n  b: {p: 0.9, b: 1}\n",
        "binary_pixels.csv": "".join(f"{i % 2}," + ",".join(str((i + j) % 2) for j in range(16)) + "\n"
                                     for i in range(20)),
        "one_image_class.csv": "".join(f"{0 if i else 1},1,2,3,4\n" for i in range(20)),
        "huge_ip.prototxt": 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                            'dim: 1000 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                            'inner_product_param { num_output: 3000000 } }\n',
        "huge_ip_plan.yaml": "layers:\n  ip: {p: 0.5, b: 4}\n",
        "labels_12.prototxt": re.sub(r'source: "[^"]*"', f'source: "{root}/labels_12"',
                                     Path(f["train_val"]).read_text()),
    }
    files = {}
    for name, text in texts.items():
        (root / name).write_text(text)
        files[name] = str(root / name)
    (root / "idx_overflow-ubyte").write_bytes(b"\0\0\x08\x03" + (0xFFFFFFFF).to_bytes(4, "big") * 3)
    np.save(root / "strings.npy", np.array(["a", "b"]))
    np.save(root / "labels.npy", np.arange(2))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.uint8))
    header["shape"] = (1 << 20, 1 << 20, 700)
    with open(root / "huge_header.npy", "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
    data = sparse_codec.decode(Path(f["clipq"]).read_bytes())[1]
    layer = next(layer for layer in data if layer.compressed)
    empty = sparse_codec.Layer(layer.name, layer.type, [np.zeros_like(layer.blobs[0])], np.zeros_like(layer.codes),
                               layer.codebook, layer.bits, 0.5)
    whole = sparse_codec.encode([empty])
    head = sparse_codec.read_header(whole)[0]
    entry = head["layers"][0]
    entry["shapes"] = [[2 ** 29, 2]]
    entry["crc32"] = sparse_codec._layer_crc({k: v for k, v in entry.items() if k != "crc32"},
                                             whole[len(whole) - entry["length"]:])
    (root / "huge_shape.clipq").write_bytes(sparse_codec.replace_header(whole, head))
    nan = caffe_io.caffe_pb2().NetParameter()
    nan.ParseFromString(Path(f["weights"]).read_bytes())
    next(layer for layer in nan.layer if layer.blobs).blobs[0].data[0] = float("nan")
    (root / "nan.caffemodel").write_bytes(nan.SerializeToString())
    datasets.write_lmdb(datasets.Split(np.zeros((24, 28, 28), np.uint8), np.arange(24) % 13), root / "labels_12")
    for name in ("a", "b"):
        (root / "photos" / name).mkdir(parents=True)
        np.save(root / "photos" / name / "not_an_image.npy", np.zeros(2))  # the folder is refused before any read
    (root / "small.csv").write_text("label,p0,p1,p2,p3\n" + "".join(f"{i % 4},1,2,3,4\n" for i in range(40)))
    subprocess.run([CLIPQ, "data", root / "small.csv", "--out", root / "small"], cwd=REPO, check=True,
                   capture_output=True)
    (root / "fewer_classes").mkdir()
    for item in (root / "small").iterdir():
        dest = root / "fewer_classes" / item.name
        shutil.copytree(item, dest) if item.is_dir() else shutil.copyfile(item, dest)
    described = json.loads((root / "fewer_classes" / "dataset.json").read_text())
    (root / "fewer_classes" / "dataset.json").write_text(json.dumps({**described, "classes": ["0", "1"]}))
    (root / "bad_experiment").mkdir()
    (root / "bad_experiment" / "experiment.json").write_text('{"train_val": 3}')
    for name in ("idx_overflow-ubyte", "strings.npy", "labels.npy", "huge_header.npy", "huge_shape.clipq",
                 "nan.caffemodel", "small", "fewer_classes", "bad_experiment", "photos"):
        files[name] = str(root / name)
    return files


def hostile_cases(h: dict[str, str], f: dict[str, str]) -> list[Case]:
    """The kinds of issue 22: files clipq did not make, unbounded inputs, Caffe's aborts, silent errors."""
    user_file = {"docs/.thesis.old-2024": f["not_an_lmdb"]}  # a file of the user's that looks like a temporary
    search = ["search", "--model", f["train_val"], "--weights", f["weights"], "--iterations", "2", "--initial", "1",
              "--subset", "100", "--jobs", "1", "--no-progress"]
    init = ["init", "--out", "{out}/exp"]
    rows = [
        ("files clipq did not make", "refused search in an --out with a user's .x.old-N file",
         search + ["--layers", "nosuch", "--out", "{out}"], user_file),
        ("bounded before read", "CSV label 1.5", ["data", h["label_1.5.csv"], "--out", "{out}/d"]),
        ("bounded before read", "CSV label nan", ["data", h["label_nan.csv"], "--out", "{out}/d"]),
        ("bounded before read", "CSV label 10^18", ["data", h["label_huge.csv"], "--out", "{out}/d"]),
        ("bounded before read", "binary file as CSV", ["data", h["binary.csv"], "--out", "{out}/d"]),
        ("bounded before read", "/dev/zero as CSV", ["data", "/dev/zero", "--kind", "csv", "--out", "{out}/d"]),
        ("bounded before read", "/dev/zero as IDX", ["data", "/dev/zero", "--kind", "idx", "--labels", "/dev/zero",
                                                    "--out", "{out}/d"]),
        ("bounded before read", "list-file label 1e3", ["data", h["list_1e3.txt"], "--out", "{out}/d"]),
        ("bounded before read", "IDX dims overflowing", ["data", h["idx_overflow-ubyte"], "--labels",
                                                        h["idx_overflow-ubyte"], "--out", "{out}/d"]),
        ("bounded before read", ".npy of strings", ["data", h["strings.npy"], "--labels", h["labels.npy"], "--out",
                                                   "{out}/d"]),
        ("bounded before read", ".npy header of 730 GiB", ["data", h["huge_header.npy"], "--labels",
                                                          h["labels.npy"], "--out", "{out}/d"]),
        ("bounded before read", "--resize 100000 100000", ["data", h["label_1.5.csv"], "--resize", "100000",
                                                          "100000", "--out", "{out}/d"]),
        ("bounded before read", "plan: alias bomb", ["convert", "--model", f["train_val"], "--plan",
                                                     h["bomb_plan.yaml"], "--output", "{out}/c.prototxt"]),
        ("bounded before read", "plan: 3,000 levels deep", ["convert", "--model", f["train_val"], "--plan",
                                                            h["deep_plan.yaml"], "--output", "{out}/c.prototxt"]),
        ("bounded before read", ".clipq declaring 10^9 weights", ["size", h["huge_shape.clipq"]]),
        ("Caffe's checks before Caffe", "deploy layer named loss",
         init + ["--deploy", h["loss_layer.prototxt"], "--data", h["small"]]),
        ("Caffe's checks before Caffe", "deploy blob named label",
         init + ["--deploy", h["label_blob.prototxt"], "--data", h["small"]]),
        ("Caffe's checks before Caffe", "deploy ending in ArgMax",
         init + ["--deploy", h["argmax.prototxt"], "--data", h["small"]]),
        ("Caffe's checks before Caffe", "deploy of an Input only",
         init + ["--deploy", h["input_only.prototxt"], "--data", h["small"]]),
        ("Caffe's checks before Caffe", "Input then Softmax",
         init + ["--deploy", h["input_softmax.prototxt"], "--data", h["small"]]),
        ("Caffe's checks before Caffe", "dataset.json with fewer classes than labels",
         init + ["--deploy", f["deploy"], "--data", h["fewer_classes"]]),
        ("Caffe's checks before Caffe", "NaN in the weights",
         ["evaluate", "--model", f["train_val"], "--weights", h["nan.caffemodel"], "--iterations", "1"]),
        ("Caffe's checks before Caffe", "labels 0..12 into a net of 10 classes",
         ["evaluate", "--model", h["labels_12.prototxt"], "--weights", f["weights"], "--iterations", "1"]),
        ("Caffe's checks before Caffe", "a weight blob over INT_MAX values",
         ["size", "--model", h["huge_ip.prototxt"], "--plan", h["huge_ip_plan.yaml"]]),
        ("silently wrong", "integer 0/1 pixels", ["data", h["binary_pixels.csv"], "--out", "{out}/d"]),
        ("silently wrong", "a class of one image", ["data", h["one_image_class.csv"], "--out", "{out}/d"]),
        ("silently wrong", "--out inside the input folder", ["data", h["photos"], "--out", h["photos"] + "/lmdb"]),
        ("silently wrong", "shared weights, two (p, b)",
         ["convert", "--model", h["shared.prototxt"], "--plan", h["shared_plan.yaml"], "--output", "{out}/c"]),
        ("silently wrong", "plan: a layer given twice", ["convert", "--model", f["train_val"], "--plan",
                                                         h["duplicate_plan.yaml"], "--output", "{out}/c.prototxt"]),
        ("tracebacks", "experiment.json with a mistyped field",
         ["compress", "--experiment", h["bad_experiment"], "--out", "{out}/c"]),
        ("hangs", "--ray at an address nobody listens on", search + ["--ray", "127.0.0.1:1", "--out", "{out}"]),
    ]
    return [Case(f"hostile: {category}", name, [str(a) for a in argv], *copies)
            for category, name, argv, *copies in rows]


# --- running and counting ----------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def classify(case: Case, returncode: int, stderr: str, out: Path) -> str:
    if "Traceback" in stderr or "Check failed" in stderr or "*** " in stderr or returncode < 0 or returncode == 134:
        return "traceback or abort"
    if returncode == 0:
        decoded = out / "d.caffemodel"
        same = case.reference is not None and decoded.is_file() and decoded.read_bytes() == case.reference.read_bytes()
        return "identical" if same else "accepted wrongly"
    lines = stderr.strip().splitlines()
    if returncode == 2 and len(lines) == 1 and lines[0].startswith(f"clipq {case.argv[0]}:"):
        return "refused clearly"
    return "other"


# Runs clipq as its child and writes the child's peak resident memory (KB) to argv[1]: a small process to fork
# from, since Linux counts the forking process's memory into a child's peak (ru_maxrss survives exec).
LAUNCHER = """import os, resource, signal, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_case(case: Case, out: Path) -> Result:
    """Run one case in its own directory `out`; a process still alive at the timeout is killed with its group."""
    out.mkdir()
    for name, source in (case.copies or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / name)
    before = snapshot(out)
    argv = [a.format(out=out) for a in case.argv]
    peak = out.with_name(out.name + ".peak")
    proc = subprocess.Popen(["python3", "-S", "-c", LAUNCHER, str(peak), str(CLIPQ), *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
        outcome = classify(case, proc.returncode, stderr, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1]
        outcome = "accepted wrongly"
    files_left = outcome not in ("accepted wrongly", "identical") and snapshot(out) != before
    peak_mb = int(peak.read_text()) / 1024 if peak.exists() and peak.read_text() else float("nan")
    return Result(case, outcome, files_left, telling_line(stderr)[:160], peak_mb)


def telling_line(stderr: str) -> str:
    """The line of stderr that says what happened: glog's fatal line, a traceback's last line, or the first line."""
    lines = [line for line in stderr.splitlines() if line.strip()] or [""]
    checks = [line for line in lines if re.match(r"F\d{8} ", line) or "Check failed" in line]
    return checks[0] if checks else lines[-1] if "Traceback" in stderr else lines[0]


def print_table(results: list[Result]) -> None:
    categories = list(dict.fromkeys(r.case.category for r in results))
    header = (f"{'category':<42}{'tried':>6}" + "".join(f"{o:>20}" for o in OUTCOMES) + f"{'files left':>12}"
              f"{'peak MB':>9}")
    print(header)
    for category in categories + ["total"]:
        rows = [r for r in results if category in ("total", r.case.category)]
        counts = Counter(r.outcome for r in rows)
        print(f"{category:<42}{len(rows):>6}" + "".join(f"{counts[o]:>20}" for o in OUTCOMES)
              + f"{sum(r.files_left for r in rows):>12}{max(r.peak_mb for r in rows):>9.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset: fewer flips, truncations and edits, "
                                                             "every third CLI case")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--verbose", action="store_true", help="list every case not refused clearly")
    args = parser.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="clipq-faults-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root / "inputs")
        cli = cli_cases(inputs) + hostile_cases(hostile_inputs(root / "hostile", inputs), inputs)
        cases = clipq_cases(inputs, root / "clipq", args.quick) + (cli[::3] if args.quick else cli)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda ic: run_case(ic[1], root / f"case{ic[0]:03d}"), enumerate(cases)))
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores | "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC | {len(cases)} cases, {args.jobs} at once, "
          f"{time.time() - start:.0f} s{' (--quick)' if args.quick else ''}")
    print_table(results)
    if args.verbose:
        for r in results:
            if r.outcome != "refused clearly" or r.files_left:
                print(f"{r.case.category} / {r.case.name}: {r.outcome}{', files left' if r.files_left else ''}"
                      f" | {r.peak_mb:.0f} MB | {r.first_line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
