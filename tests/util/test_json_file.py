"""JSON files read back as a user may have edited them: one line naming the file and the field."""

from __future__ import annotations

import pytest

from clipq.util.errors import ClipqError
from clipq.util.json_file import read_object

FIELDS = {"weights": str, "val_lmdb": (str, type(None)), "classes": list}


@pytest.mark.parametrize("text, message", [
    ('{"val_lmdb": null, "classes": []}', "field 'weights' is missing"),
    ('{"weights": 3, "val_lmdb": null, "classes": []}', "field 'weights' is an integer, expected a string"),
    ('{"weights": "w", "val_lmdb": true, "classes": []}', "field 'val_lmdb' is true or false, expected a string or null"),
    ('[1, 2]', "holds a list, not a JSON object"),
    ('{"weights": ', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
], ids=["missing", "mistyped", "bool", "list", "truncated", "deep"])
def test_a_bad_file_is_one_line_naming_the_field(tmp_path, text, message):
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(ClipqError, match=message) as error:
        read_object(tmp_path / "x.json", FIELDS, "missing file")
    assert str(error.value).startswith(str(tmp_path / "x.json")) and "\n" not in str(error.value)


def test_a_good_file_and_a_missing_one(tmp_path):
    (tmp_path / "x.json").write_text('{"weights": "w", "val_lmdb": null, "classes": ["a"], "extra": 1}')
    assert read_object(tmp_path / "x.json", FIELDS, "m")["classes"] == ["a"]
    with pytest.raises(ClipqError, match="^no experiment here$"):
        read_object(tmp_path / "y.json", FIELDS, "no experiment here")
