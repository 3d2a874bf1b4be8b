"""The `param_str` of clipq's Caffe Python layers: JSON holding the wrapped layer's whole parameter message
(`convolution_param` or `inner_product_param`), the layer's name and the method's options (for a CLIP-Q layer
`p` and `bits`), so the layer is self-describing:

    python_param { module: "clipq_layers" layer: "ClipQConvolution"
                   param_str: '{"p": 0.2, "bits": 8, "convolution_param": {"num_output": 20, ...}, "name": "conv1"}' }

Pure Python (the layers parse it before they touch Caffe); errors name the layer and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from clipq.plan import LayerPlan

WRAPPED = {"Convolution": "convolution_param", "InnerProduct": "inner_product_param"}


@dataclass(frozen=True)
class WrappedParam:
    """What any clipq Python layer reads from its param_str: the wrapped layer's parameters, its name and
    the method's options (JSON: {"<type>_param": {...}, "name": ..., option: value, ...})."""

    type: str                      # wrapped Caffe layer type: Convolution | InnerProduct
    param: dict                    # the wrapped *_param message, as protobuf's JSON mapping
    name: str = ""                 # the layer's name (a Python layer cannot see it otherwise; for errors)
    options: dict = field(default_factory=dict)

    def to_param_str(self) -> str:
        return json.dumps({**self.options, WRAPPED[self.type]: self.param, "name": self.name}, sort_keys=True)

    @classmethod
    def from_param_str(cls, text: str, layer_type: str, options: tuple[str, ...] | None = None,
                       kind: str = "clipq") -> "WrappedParam":
        """Parse; `options` lists the keys the layer accepts (None: any). Errors name the layer and key."""
        try:
            name = str(json.loads(text).get("name", "?"))
        except (json.JSONDecodeError, AttributeError):
            name = "?"
        where = f"{kind} layer '{name}' ({layer_type}) param_str"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        key = WRAPPED[layer_type]
        if options is not None:
            unknown = set(data) - {*options, key, "name"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected {', '.join(options)}, "
                                 f"{key}, name")
        if key not in data or not isinstance(data[key], dict):
            raise ValueError(f"{where}: '{key}' (the wrapped layer's parameters) is missing")
        rest = {k: v for k, v in data.items() if k not in (key, "name")}
        return cls(layer_type, data[key], name, rest)


@dataclass(frozen=True)
class LayerConfig:
    """What a CLIP-Q Python layer reads from its param_str."""

    p: float
    bits: int
    type: str                      # wrapped Caffe layer type: Convolution | InnerProduct
    param: dict = field(default_factory=dict)  # the wrapped *_param message, as protobuf's JSON mapping
    name: str = ""                 # the layer's name (a Python layer cannot see it otherwise; for errors)
    ramp: int = 0                  # p ramps up to its value over this many training passes (gradual pruning);
                                   # the layer then has a state blob, its pass count

    def to_param_str(self) -> str:
        options = {"p": self.p, "bits": self.bits, **({"ramp": self.ramp} if self.ramp else {})}
        return WrappedParam(self.type, self.param, self.name, options).to_param_str()

    @classmethod
    def from_param_str(cls, text: str, layer_type: str) -> "LayerConfig":
        """Parse and validate; errors name the layer and the key."""
        wrapped = WrappedParam.from_param_str(text, layer_type, ("p", "bits", "ramp"), "CLIP-Q")
        ramp = wrapped.options.get("ramp", 0)
        try:
            lp = LayerPlan(wrapped.options.get("p"), wrapped.options.get("bits"))
            if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
                raise ValueError(f"ramp must be an integer >= 0 (training passes), got {ramp!r}")
        except ValueError as e:
            raise ValueError(f"CLIP-Q layer '{wrapped.name}' ({layer_type}) param_str: {e}") from None
        return cls(lp.p, lp.bits, layer_type, wrapped.param, wrapped.name, ramp)
