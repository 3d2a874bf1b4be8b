"""The clipq layers' param_str: pure Python (no Caffe), errors that name the layer and the key."""

from __future__ import annotations

import pytest

from clipq.caffe.param_str import LayerConfig


def test_param_str_round_trips():
    config = LayerConfig(0.3, 4, "Convolution", {"num_output": 20, "kernel_size": [5]}, "conv1")
    assert LayerConfig.from_param_str(config.to_param_str(), "Convolution") == config


@pytest.mark.parametrize("text,message", [
    ("p=0.3", "not JSON"),
    ('{"p": 0.3, "bits": 3}', "'inner_product_param' (the wrapped layer's parameters) is missing"),
    ('{"p": 0.3, "bits": 3, "inner_product_param": {}, "typo": 1}', "unknown key(s) ['typo']"),
    ('{"p": -0.1, "bits": 3, "inner_product_param": {}}', "p must be a number in [0, 1)"),
])
def test_bad_param_str_is_a_value_error_naming_the_problem(text, message):
    with pytest.raises(ValueError) as info:
        LayerConfig.from_param_str(text, "InnerProduct")
    assert message in str(info.value)
