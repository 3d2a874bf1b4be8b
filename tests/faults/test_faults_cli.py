"""Bad command-line inputs: every one exits 2 with one line naming the file or the field, and writes nothing.

Cases where Caffe itself would abort if clipq let the input through run as subprocesses (an abort would
take pytest down with it); the others run `cli.main` in-process.
"""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipq import cli
from clipq.caffe import nets
from clipq.data import datasets
from clipq.plan import LayerPlan
from clipq.workflows import compressed_model
from conftest import REPO, random_caffemodel


def _train_val(path: Path, lmdb: Path) -> None:
    data = nets.DataSpec(str(lmdb), str(lmdb), train_batch=8, test_batch=8, input_shape=(8, 1, 28, 28),
                         scale=1 / 256)
    path.write_text(str(nets.train_val("t", nets.lenet5_body, data)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory, fashion_mnist_slices) -> Path:
    """Good and bad inputs for LeNet-5: prototxts, caffemodels, LMDBs, plans, solvers, a .clipq file."""
    a = tmp_path_factory.mktemp("assets")
    _train_val(a / "tv.prototxt", fashion_mnist_slices["tiny"])
    _train_val(a / "tv_missing_lmdb.prototxt", a / "nowhere_lmdb")
    rng = np.random.default_rng(0)
    datasets.write_lmdb(datasets.Split(rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), np.zeros(8, int)),
                        a / "small8_lmdb")
    _train_val(a / "tv8.prototxt", a / "small8_lmdb")
    (a / "val_lmdb").symlink_to(fashion_mnist_slices["tiny"])
    data = nets.DataSpec("unused", "unused", train_batch=8, test_batch=8, input_shape=(8, 1, 28, 28), scale=1 / 256)
    (a / "deploy.prototxt").write_text(str(nets.deploy("t", nets.lenet5_body, data)))
    (a / "lenet300.prototxt").write_text(str(nets.deploy("o", nets.lenet300_100_body, data)))
    random_caffemodel(a / "deploy.prototxt", a / "w.caffemodel", std=0.1)
    random_caffemodel(a / "lenet300.prototxt", a / "other.caffemodel", std=0.1)
    (a / "empty.caffemodel").write_bytes(b"")
    (a / "notes.caffemodel").write_text("trained for 10 epochs\n")
    (a / "empty.prototxt").write_text("")
    (a / "bad.prototxt").write_text('name: "x"\nlayer {\n  name: "a"\n  typo: 3\n}\n')
    (a / "plan.yaml").write_text("version: 1\nlayers:\n  conv2: {p: 0.5, b: 4}\n  ip1: {p: 0.9, b: 3}\n")
    (a / "pool_plan.yaml").write_text("version: 1\nlayers:\n  pool1: {p: 0.5, b: 4}\n")
    (a / "solver.prototxt").write_text(f'net: "{a / "tv.prototxt"}"\nbase_lr: 0.001\nmax_iter: 2\n'
                                       f'snapshot_prefix: "{a / "snap" / "t"}"\nsolver_mode: CPU\n')
    (a / "sub").mkdir()
    (a / "sub" / "tv.prototxt").write_text((a / "tv.prototxt").read_text())
    (a / "sub" / "solver.prototxt").write_text(f'net: "tv.prototxt"\nbase_lr: 0.001\nmax_iter: 2\n'
                                               f'snapshot_prefix: "{a / "snap" / "t"}"\n')
    compressed_model.encode_file(a / "deploy.prototxt", a / "w.caffemodel", a / "model.clipq",
                                 {"conv2": LayerPlan(0.5, 4)})
    _own_data_assets(a, rng)
    return a


def _own_data_assets(a: Path, rng) -> None:
    """Inputs of `clipq data` / `init`: CSVs, a folder of ragged photos, data directories a deploy cannot take."""
    from PIL import Image

    from clipq.data import data_import, experiment, image_sources
    (a / "digits.csv").write_text("".join(f"{i % 2}," + ",".join(["7"] * 16) + "\n" for i in range(20)))
    (a / "ragged.csv").write_text("1,2,3,4,5\n0,1,2\n")
    np.save(a / "images.npy", np.zeros((4, 8, 8), np.uint8))
    for name, size in (("a", (8, 8)), ("b", (8, 9))):
        (a / "photos_ragged" / name).mkdir(parents=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(a / "photos_ragged" / name / "1.png")
    for name, shape in (("data8", (30, 1, 8, 8)), ("data_color", (30, 3, 28, 28)), ("data28", (30, 1, 28, 28))):
        np.savez(a / f"{name}.npz", images=rng.integers(0, 256, shape, dtype=np.uint8), labels=np.arange(30) % 3)
        data_import.import_images(image_sources.load(a / f"{name}.npz"), a / name, data_import.ImportSettings(),
                                  progress=False)
    experiment.init(a / "deploy.prototxt", a / "data28", a / "exp")  # no baseline trained


GOOD_SEARCH = "search --model {a}/tv.prototxt --weights {a}/w.caffemodel --out {o}/s"
GOOD_COMPRESS = "compress --model {a}/tv.prototxt --weights {a}/w.caffemodel --solver {a}/solver.prototxt --out {o}/c"
GOOD_COMPARE = ("compare --model {a}/tv.prototxt --weights {a}/w.caffemodel --solver {a}/solver.prototxt "
                "--out {o}/c --val {a}/val_lmdb")
GOOD_ZOO = "zoo --model {a}/deploy.prototxt --weights {a}/w.caffemodel --out {o}/z --p 0.5 --b 4"
EVALUATE = "evaluate --model {a}/tv.prototxt --weights {a}/w.caffemodel"

CASES = [  # (id, command line, what the message must name, run in a subprocess)
    ("evaluate-empty-weights", "evaluate --model {a}/tv.prototxt --weights {a}/empty.caffemodel",
     "empty.caffemodel: not a caffemodel", False),
    ("evaluate-text-weights", "evaluate --model {a}/tv.prototxt --weights {a}/notes.caffemodel",
     "notes.caffemodel: not a", False),
    ("evaluate-other-nets-weights", "evaluate --model {a}/tv.prototxt --weights {a}/other.caffemodel",
     "layer 'ip1' weights have shape 300x784", True),
    ("evaluate-missing-weights", "evaluate --model {a}/tv.prototxt --weights {a}/missing.caffemodel",
     "missing.caffemodel: file not found", False),
    ("evaluate-empty-prototxt", "evaluate --model {a}/empty.prototxt --weights {a}/w.caffemodel",
     "empty.prototxt: no layers", True),
    ("evaluate-malformed-prototxt", "evaluate --model {a}/bad.prototxt --weights {a}/w.caffemodel",
     "bad.prototxt:4:3:", True),
    ("evaluate-missing-lmdb", "evaluate --model {a}/tv_missing_lmdb.prototxt --weights {a}/w.caffemodel",
     "layer 'data_test': data_param.source", True),
    ("evaluate-images-too-small", "evaluate --model {a}/tv8.prototxt --weights {a}/w.caffemodel",
     "layer 'conv2' (Convolution) would output an empty blob", True),
    ("evaluate-zero-iterations", EVALUATE + " --iterations 0", "argument --iterations", False),
    ("evaluate-negative-iterations", EVALUATE + " --iterations -3", "argument --iterations", False),
    ("convert-output-directory", "convert --model {a}/tv.prototxt --plan {a}/plan.yaml --output {o}",
     "is a directory", False),
    ("convert-output-is-the-input", "convert --model {a}/tv.prototxt --plan {a}/plan.yaml --output {a}/tv.prototxt",
     "is also the model file", False),
    ("export-empty-weights", "export --model {a}/tv.prototxt --weights {a}/empty.caffemodel --output {o}/e.caffemodel",
     "empty.caffemodel: not a caffemodel", False),
    ("encode-output-directory", "encode --model {a}/deploy.prototxt --weights {a}/w.caffemodel --plan {a}/plan.yaml "
     "--output {o}", "is a directory", False),
    ("encode-empty-weights", "encode --model {a}/deploy.prototxt --weights {a}/empty.caffemodel --plan {a}/plan.yaml "
     "--output {o}/m.clipq", "empty.caffemodel: not a caffemodel", False),
    ("decode-empty-prototxt", "decode {a}/model.clipq --output {o}/d.caffemodel --model {a}/empty.prototxt",
     "empty.prototxt: no layers", True),
    ("decode-output-directory", "decode {a}/model.clipq --output {o}", "is a directory", False),
    ("train-net-relative-to-the-solver", "train --solver {a}/sub/solver.prototxt", "it is at", False),
    ("train-empty-weights", "train --solver {a}/solver.prototxt --weights {a}/empty.caffemodel",
     "empty.caffemodel: not a caffemodel", False),
    ("train-output-directory", "train --solver {a}/solver.prototxt --output {o}", "is a directory", False),
    ("search-out-is-a-file", "search --model {a}/tv.prototxt --weights {a}/w.caffemodel --out {a}/plan.yaml",
     "is a file, not a directory", False),
    ("search-zero-jobs", GOOD_SEARCH + " --jobs 0", "argument --jobs", False),
    ("search-p-max-above-1", GOOD_SEARCH + " --p-max 1.5", "argument --p-max", False),
    ("search-p-max-0", GOOD_SEARCH + " --p-max 0", "argument --p-max", False),
    ("search-zero-initial", GOOD_SEARCH + " --initial 0", "argument --initial", False),
    ("search-initial-above-iterations", GOOD_SEARCH + " --initial 9 --iterations 3",
     "--initial 9 is more than --iterations 3", False),
    ("search-negative-lambda", GOOD_SEARCH + " --lam -5", "argument --lam", False),
    ("search-zero-subset", GOOD_SEARCH + " --subset 0", "argument --subset", False),
    ("search-zero-iterations", GOOD_SEARCH + " --iterations 0", "argument --iterations", False),
    ("search-missing-weights", "search --model {a}/tv.prototxt --weights {a}/missing.caffemodel --out {o}/s",
     "missing.caffemodel: file not found", False),
    ("search-missing-data", GOOD_SEARCH + " --data {a}/nowhere_lmdb", "--data '", False),
    ("compress-plan-names-a-pooling-layer", GOOD_COMPRESS + " --plan {a}/pool_plan.yaml",
     "pool_plan.yaml (--plan)", False),
    ("compress-missing-plan", GOOD_COMPRESS + " --plan {a}/missing.yaml", "missing.yaml: file not found", False),
    ("compress-missing-solver", "compress --model {a}/tv.prototxt --weights {a}/w.caffemodel "
     "--solver {a}/missing_solver.prototxt --out {o}/c", "missing_solver.prototxt: file not found", False),
    ("compress-empty-weights", "compress --model {a}/tv.prototxt --weights {a}/empty.caffemodel "
     "--solver {a}/solver.prototxt --out {o}/c", "empty.caffemodel: not a caffemodel", False),
    ("compress-images-too-small", "compress --model {a}/tv8.prototxt --weights {a}/w.caffemodel "
     "--solver {a}/solver.prototxt --out {o}/c", "layer 'conv2'", True),
    ("compress-val-images-too-small", GOOD_COMPRESS + " --val {a}/small8_lmdb", "small8_lmdb", True),
    ("compress-out-is-a-file", "compress --model {a}/tv.prototxt --weights {a}/w.caffemodel "
     "--solver {a}/solver.prototxt --out {a}/plan.yaml", "is a file, not a directory", False),
    ("compress-zero-max-iter", GOOD_COMPRESS + " --max-iter 0", "argument --max-iter", False),
    ("compress-zero-rounds", GOOD_COMPRESS + " --rounds 0", "argument --rounds", False),
    ("compress-negative-max-drop", GOOD_COMPRESS + " --max-drop -1", "argument --max-drop", False),
    ("compare-without-val", GOOD_COMPARE.replace(" --val {a}/val_lmdb", ""), "--val", False),
    ("compare-missing-val", GOOD_COMPARE.replace("{a}/val_lmdb", "{a}/nowhere_lmdb"), "nowhere_lmdb", False),
    ("compare-val-images-too-small", GOOD_COMPARE.replace("{a}/val_lmdb", "{a}/small8_lmdb"), "small8_lmdb", True),
    ("compare-empty-weights", GOOD_COMPARE.replace("w.caffemodel", "empty.caffemodel"),
     "empty.caffemodel: not a caffemodel", False),
    ("compare-another-nets-weights", GOOD_COMPARE.replace("w.caffemodel", "other.caffemodel"), "other.caffemodel",
     False),
    ("compare-target-below-1", GOOD_COMPARE + " --targets 0.5 40", "--targets", False),
    ("compare-unknown-method", GOOD_COMPARE + " --methods clipq magic", "argument --methods", False),
    ("compare-without-clipq", GOOD_COMPARE + " --methods dns lc", "--methods must include clipq", False),
    ("compare-zero-lc-steps", GOOD_COMPARE + " --lc-steps 0", "argument --lc-steps", False),
    ("compare-out-is-a-file", GOOD_COMPARE.replace("{o}/c", "{a}/plan.yaml"), "is a file, not a directory", False),
    ("zoo-out-is-a-file", "zoo --model {a}/deploy.prototxt --weights {a}/w.caffemodel --out {a}/plan.yaml "
     "--p 0.5 --b 4", "is a file, not a directory", False),
    ("zoo-zero-batch", GOOD_ZOO + " --batch 0", "argument --batch", False),
    ("zoo-zero-jobs", GOOD_ZOO + " --jobs 0", "argument --jobs", False),
    ("zoo-empty-weights", "zoo --model {a}/deploy.prototxt --weights {a}/empty.caffemodel --out {o}/z --p 0.5 --b 4",
     "empty.caffemodel: not a caffemodel", False),
    ("data-out-exists", "data {a}/digits.csv --out {a}/data28", "data28: already exists", False),
    ("data-ragged-csv", "data {a}/ragged.csv --out {o}/d", "ragged.csv:2: 2 pixels, but the first row has 4", False),
    ("data-ragged-photos", "data {a}/photos_ragged --out {o}/d --val 0 --test 0 --no-progress", "b/1.png: image is 1x8x9", False),
    ("data-npy-without-labels", "data {a}/images.npy --out {o}/d", "give their labels with --labels", False),
    ("data-csv-not-square", "data {a}/digits.csv --out {o}/d --shape 1,3,5", "do not make --shape 1x3x5", False),
    ("data-bad-shape", "data {a}/digits.csv --out {o}/d --shape 2,4,4", "argument --shape", False),
    ("data-val-fraction-1", "data {a}/digits.csv --out {o}/d --val 1", "argument --val", False),
    ("data-fractions-leave-no-training", "data {a}/digits.csv --out {o}/d --val 0.5 --test 0.5",
     "together below 1", False),
    ("data-missing-input", "data {a}/nothing.csv --out {o}/d", "nothing.csv: no such file", False),
    ("init-images-too-small", "init --deploy {a}/deploy.prototxt --data {a}/data8 --out {o}/e",
     "layer 'conv2' (Convolution) would output an empty blob", False),
    ("init-channels", "init --deploy {a}/deploy.prototxt --data {a}/data_color --out {o}/e", "--gray", False),
    ("init-no-lmdbs", "init --deploy {a}/deploy.prototxt --data {a}/photos_ragged --out {o}/e", "no train_lmdb",
     False),
    ("init-empty-deploy", "init --deploy {a}/empty.prototxt --data {a}/data28 --out {o}/e", "empty.prototxt: no layers",
     False),
    ("init-out-exists", "init --deploy {a}/deploy.prototxt --data {a}/data28 --out {a}/exp", "already exists", False),
    ("compress-experiment-without-baseline", "compress --experiment {a}/exp --out {o}/c",
     "no baseline yet; train it first", False),
    ("compress-not-an-experiment", "compress --experiment {a}/data28 --out {o}/c", "no experiment.json", False),
    ("zoo-empty-prototxt", "zoo --model {a}/empty.prototxt --weights {a}/w.caffemodel --out {o}/z --p 0.5 --b 4",
     "empty.prototxt: no layers", True),
]


def files_under(directory: Path) -> set[Path]:
    return set(directory.rglob("*"))


def run_clipq(argv: list[str], in_process: bool, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `clipq ARGV`."""
    if not in_process:
        proc = subprocess.run([sys.executable, "-m", "clipq", *argv], cwd=REPO, capture_output=True, text=True)
        return proc.returncode, proc.stderr
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(case, assets, tmp_path, capsys):
    _, line, named, in_subprocess = case
    argv = line.format(a=assets, o=tmp_path).split()
    before = files_under(assets)
    code, err = run_clipq(argv, not in_subprocess, capsys)
    lines = [text for text in err.splitlines() if text.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"clipq {argv[0]}: ") and named in lines[0], lines[0]
    assert files_under(tmp_path) == set() and files_under(assets) == before


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def test_a_write_failing_for_lack_of_space_is_one_line_and_leaves_nothing(assets, tmp_path):
    argv = ["encode", "--model", str(assets / "deploy.prototxt"), "--weights", str(assets / "w.caffemodel"),
            "--plan", str(assets / "plan.yaml"), "--output", str(tmp_path / "m.clipq")]
    proc = subprocess.run([sys.executable, "-m", "clipq", *argv], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=_small_file_limit)
    assert proc.returncode == 2
    assert re.fullmatch(r"clipq encode: .*m\.clipq: File too large\n", proc.stderr)
    assert files_under(tmp_path) == set()
