"""Plan files: pure Python, errors that name the file, layer and field."""

from __future__ import annotations

import json

import pytest

from clipq.plan import LayerPlan, load_plan, save_plan
from clipq.util.errors import ClipqError


def write(tmp_path, text, name="plan.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plan_accepts_b_or_bits_in_yaml_and_json(tmp_path):
    plan = load_plan(write(tmp_path, "version: 1\nlayers:\n  conv1: {p: 0.2, b: 8}\n  fc6: {p: 0.96, bits: 3}\n"))
    assert plan == {"conv1": LayerPlan(0.2, 8), "fc6": LayerPlan(0.96, 3)}
    doc = {"version": 1, "layers": {"ip1": {"p": 0.5, "b": 2}}}
    assert load_plan(write(tmp_path, json.dumps(doc), "plan.json")) == {"ip1": LayerPlan(0.5, 2)}


def test_save_then_load_round_trips(tmp_path):
    plan = {"conv1": LayerPlan(0.21, 8), "fc8": LayerPlan(0.74, 3)}
    for name in ("p.yaml", "p.json"):
        save_plan(plan, tmp_path / name, extra={"lambda": 40})
        assert load_plan(tmp_path / name) == plan


def test_a_rate_that_would_round_to_1_is_saved_as_it_is(tmp_path):
    # p is saved to 4 decimals, but 0.99996 must not become 1, which is no pruning rate
    save_plan({"ip1": LayerPlan(0.99996, 2), "ip2": LayerPlan(0.123456, 3)}, tmp_path / "p.yaml")
    assert load_plan(tmp_path / "p.yaml") == {"ip1": LayerPlan(0.99996, 2), "ip2": LayerPlan(0.1235, 3)}


@pytest.mark.parametrize("entry,message", [
    ("{p: 1.0, b: 3}", "layer 'fc6': p must be a number in [0, 1), got 1.0"),
    ("{p: 0.5, b: 9}", "layer 'fc6': b (bits) must be an integer in 1..8, got 9"),
    ("{p: 0.5, b: 2.5}", "layer 'fc6': b (bits) must be an integer in 1..8, got 2.5"),
    ("{p: 0.5}", "layer 'fc6': needs p and exactly one of b / bits"),
    ("{p: 0.5, b: 3, bits: 3}", "layer 'fc6': needs p and exactly one of b / bits"),
    ("{p: 0.5, b: 3, q: 1}", "layer 'fc6': unknown field(s) ['q']"),
    ("0.5", "layer 'fc6': expected a mapping"),
])
def test_bad_entries_name_the_file_layer_and_field(tmp_path, entry, message):
    path = write(tmp_path, f"layers:\n  fc6: {entry}\n")
    with pytest.raises(ClipqError) as info:
        load_plan(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_newer_plan_version_is_refused(tmp_path):
    with pytest.raises(ClipqError, match="plan version 2 is not supported"):
        load_plan(write(tmp_path, "version: 2\nlayers: {}\n"))


def test_missing_plan_file_is_named(tmp_path):
    with pytest.raises(ClipqError, match="nope.yaml: cannot read plan"):
        load_plan(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("a: &a [x, x, x, x, x, x, x, x]\nb: [*a, *a, *a, *a, *a, *a, *a, *a]\n", "aliases .* are not allowed"),
    ("layers:\n  ip1: {p: 0.5, b: 3}\n  ip1: {p: 0.9, b: 2}\n", "key 'ip1' appears twice"),
    ("[" * 3000 + "]" * 3000, "nested more than 8 levels deep"),
    ("layers: {ip1: {p: 0.5, b: 3}\n", r"expected ',' or '}'.* \(line 2, column 1\)"),
], ids=["alias bomb", "duplicate layer", "deep nesting", "syntax"])
def test_a_hostile_plan_file_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ClipqError, match=message) as error:
        load_plan(path)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_a_huge_or_binary_file_is_not_read_as_a_plan(tmp_path):
    (tmp_path / "big.yaml").write_bytes(b"#" * (5 << 20))
    with pytest.raises(ClipqError, match="larger than 4 MB, not a plan"):
        load_plan(tmp_path / "big.yaml")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(ClipqError, match="not a text file"):
        load_plan(tmp_path / "bin.yaml")
