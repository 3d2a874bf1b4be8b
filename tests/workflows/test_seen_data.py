"""`make seen-data`'s case at a smaller size (slow tier): a baseline trained on every image of the user's data,
compressed with --max-drop on a split of those images, judged on images it never saw (tools/seen_data.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from clipq import cli

pytestmark = pytest.mark.slow


def tool(repo, *args) -> str:
    done = subprocess.run([sys.executable, str(repo / "tools" / args[0]), *map(str, args[1:])], cwd=repo,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_baseline_that_saw_the_validation_images_is_flagged_and_judged_on_unseen_ones(
        tmp_path, repo, fashion_mnist_slices, capsys):
    images, everything, data = tmp_path / "images.csv", tmp_path / "all", tmp_path / "data"
    tool(repo, "fashion_mnist_csv.py", images, "--count", "1000")
    assert cli.main(["data", str(images), "--out", str(everything), "--val", "0", "--test", "0",
                     "--no-progress"]) == 0
    tool(repo, "seen_data.py", "baseline", "--data", everything, "--test", fashion_mnist_slices["test"],
         "--out", tmp_path / "zoo", "--iterations", "800")
    assert cli.main(["data", str(images), "--out", str(data), "--val", "0.2", "--test", "0.1", "--no-progress"]) == 0
    assert cli.main(["init", "--deploy", str(repo / "prototxt/lenet5/deploy.prototxt"), "--data", str(data),
                     "--out", str(tmp_path / "exp"), "--finetune-epochs", "1", "--min-iter", "20"]) == 0
    capsys.readouterr()
    code = cli.main(["compress", "--experiment", str(tmp_path / "exp"), "--weights", str(tmp_path / "zoo" /
                     "zoo.caffemodel"), "--out", str(tmp_path / "run"), "--max-drop", "0.3", "--iterations", "6",
                     "--initial", "3", "--rounds", "2", "--no-progress"])
    assert code in (0, 1)  # 1: no plan met the budget (the report says so)
    assert "it looks trained on the validation images too" in capsys.readouterr().err
    table = tool(repo, "seen_data.py", "report", "--net", tmp_path / "zoo" / "train_val.prototxt", "--weights",
                 tmp_path / "zoo" / "zoo.caffemodel", tmp_path / "run")
    unseen = re.search(r"Baseline top-1 on the 1,000 unseen test images: ([0-9.]+)%", table)
    assert unseen and 50 < float(unseen.group(1)) < 95  # learnt, but well below its ~100% on the images it saw
    row = next(line for line in table.splitlines() if line.startswith(f"| {tmp_path / 'run'} |"))
    assert re.search(r"\| [0-9.]+x \| [+-][0-9.]+ \| [0-9.]+ \| [+-][0-9.]+ \|", row)
