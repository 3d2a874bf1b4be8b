"""The Caffe build clipq runs on: its stamp, its tools, run so that they never leave a half-written output."""

from __future__ import annotations

import pytest

from clipq.caffe import build
from clipq.util.errors import ClipqError


def test_the_stamp_is_the_one_install_caffe_sh_wrote_into_pycaffes_build(caffe_root):
    stamp = build.read_build_stamp()
    assert stamp == build.read_build_stamp(caffe_root) and stamp["source_kind"] in ("bvlc", "brocolli")
    assert build.has_opencv() == (stamp.get("opencv") == "1")


def test_a_tool_the_build_lacks_is_named():
    with pytest.raises(ClipqError, match="Caffe's no_such_tool is not built"):
        build.tool("no_such_tool")


def test_a_tool_writes_its_output_only_when_it_succeeds(tmp_path, repo):
    out = tmp_path / "deploy.prototxt"
    build.run_tool("upgrade_net_proto_text", repo / "prototxt/lenet5/deploy.prototxt", output=out)
    assert "LeNet" in out.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["deploy.prototxt"]


def test_a_tool_never_writes_over_its_input(tmp_path):
    source = tmp_path / "net.prototxt"
    source.write_text("name: 'x'")
    with pytest.raises(ClipqError, match="refusing to overwrite an input"):
        build.run_tool("upgrade_net_proto_text", source, output=source)
    assert source.read_text() == "name: 'x'"


def test_a_failing_caffe_upgrade_tool_is_reported(tmp_path):
    (tmp_path / "bad.caffemodel").write_bytes(b"not a caffemodel")
    with pytest.raises(ClipqError, match="bad.caffemodel: Caffe's upgrade_net_proto_binary failed"):
        build.run_tool("upgrade_net_proto_binary", tmp_path / "bad.caffemodel", output=tmp_path / "out.caffemodel")
    assert not list(tmp_path.glob("*out.caffemodel*"))  # nothing half-written
