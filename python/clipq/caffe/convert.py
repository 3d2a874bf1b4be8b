"""Plain Caffe nets <-> CLIP-Q nets: `clipq convert` (prototxt) and `clipq export` (caffemodel).

convert: every layer named in the plan becomes a `type: "Python"` CLIP-Q layer with the same name,
bottoms, tops, `param { lr_mult decay_mult }` and include/exclude rules; its Convolution/InnerProduct
parameters move into `param_str`. Everything else is copied unchanged.

export: a caffemodel trained with CLIP-Q layers -> a plain caffemodel whose weights are the final
quantized ones (computed with the same operator), loadable with the original deploy prototxt.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import json_format

from clipq.caffe import caffe_io
from clipq.caffe.param_str import WRAPPED, LayerConfig, WrappedParam
from clipq.methods import METHODS
from clipq.methods.base import LayerRole
from clipq.plan import LayerPlan
from clipq.quant import prune_quant
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError

LAYER_MODULE = "clipq_layers"
# The kinds of Python layer in layers/clipq_layers.py that the registered methods use; each wraps Convolution
# and InnerProduct (class "<kind><type>", e.g. MaskedConvolution).
LAYER_KINDS = METHODS.layer_kinds()
LAYER_CLASS = {"Convolution": "ClipQConvolution", "InnerProduct": "ClipQInnerProduct"}
CLASS_TYPE = {cls: t for t, cls in LAYER_CLASS.items()}
METHOD_CLASS_TYPE = {f"{kind}{t}": t for kind in LAYER_KINDS for t in WRAPPED}


def compressible_layers(net_param) -> list[str]:
    """Names of the Convolution / InnerProduct layers, in net order (each name once)."""
    names = [layer.name for layer in net_param.layer if layer.type in WRAPPED]
    return list(dict.fromkeys(names))


def _check_net(net_param, source: str) -> None:
    if len(net_param.layers):
        raise ClipqError(f"{source}: uses Caffe's deprecated V1 'layers' format; upgrade it first "
                         "(Caffe's tools/upgrade_net_proto_text)")


def weight_sharers(net_param) -> dict[str, list[str]]:
    """{layer: every compressible layer sharing its weights (`param { name: ... }` on the weights), it first}
    for the layers that share them; Caffe keeps one blob for them all."""
    groups: dict[str, list[str]] = {}
    for layer in net_param.layer:
        if layer.type in WRAPPED and layer.param and layer.param[0].name:
            groups.setdefault(layer.param[0].name, []).append(layer.name)
    return {name: [name] + [other for other in group if other != name]
            for group in groups.values() if len(group) > 1 for name in group}


def searched_layers(net_param) -> list[str]:
    """The compressible layers whose (p, b) a search chooses: of layers sharing weights only the first in the
    net (the others follow it, `with_sharers`)."""
    sharers = weight_sharers(net_param)
    names = compressible_layers(net_param)
    return [name for name in names if not any(names.index(o) < names.index(name) for o in sharers.get(name, []))]


def with_sharers(net_param, plan: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
    """The plan with every layer that shares weights with a planned one given that layer's (p, b)."""
    sharers = weight_sharers(net_param)
    filled = dict(plan)
    for name in plan:
        for other in sharers.get(name, []):
            filled.setdefault(other, plan[name])
    return filled


def check_plan(net_param, plan: dict[str, LayerPlan], source: str = "net") -> None:
    """Every layer the plan names must be a Convolution / InnerProduct layer of the net, and layers that share
    their weights must share their (p, b) too."""
    _check_net(net_param, source)
    for name, group in weight_sharers(net_param).items():
        other = next((o for o in group[1:] if o in plan and name in plan and plan[o] != plan[name]), None)
        if other is not None:
            raise ClipqError(f"{source}: layers '{name}' (p {plan[name].p:g}, b {plan[name].bits}) and '{other}' "
                             f"(p {plan[other].p:g}, b {plan[other].bits}) share their weights, so they need one "
                             "(p, b)")
    by_name = {}
    for layer in net_param.layer:
        by_name.setdefault(layer.name, []).append(layer)
    for name in plan:
        if name not in by_name:
            raise ClipqError(f"{source}: the plan names layer '{name}', which is not in the net; "
                             f"compressible layers: {', '.join(compressible_layers(net_param)) or 'none'}")
        bad = [layer.type for layer in by_name[name] if layer.type not in WRAPPED]
        if bad:
            raise ClipqError(f"{source}: layer '{name}' is a {bad[0]} layer; only Convolution and "
                             "InnerProduct layers can be pruned-quantized")


def to_clipq(net_param, plan: dict[str, LayerPlan], source: str = "net"):
    """The same net with the plan's layers replaced by CLIP-Q Python layers (a new NetParameter)."""
    check_plan(net_param, plan, source)
    return to_method_net(net_param, {name: LayerRole("ClipQ", {"p": float(lp.p), "bits": int(lp.bits)})
                                     for name, lp in with_sharers(net_param, plan).items()})


def to_method_net(net_param, roles: dict[str, LayerRole]):
    """The same net with the named Convolution / InnerProduct layers replaced by the roles' Python layers."""
    out = caffe_io.caffe_pb2().NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layer.name in roles:
            _make_python_layer(layer, roles[layer.name])
    return out


def own_blobs(layer) -> int:
    """Blobs of a Convolution / InnerProduct layer: weights, and the bias unless bias_term is false."""
    return 2 if getattr(layer, WRAPPED[layer.type]).bias_term else 1


def _make_python_layer(layer, role: LayerRole) -> None:
    field = WRAPPED[layer.type]
    wrapped = json_format.MessageToDict(getattr(layer, field), preserving_proto_field_name=True)
    if role.state_blobs:
        while len(layer.param) < own_blobs(layer):
            layer.param.add()  # Caffe's defaults, spelled out so the state blobs' entries line up
        for _ in range(role.state_blobs):
            layer.param.add(lr_mult=0, decay_mult=0)
    layer.python_param.module = LAYER_MODULE
    layer.python_param.layer = f"{role.kind}{layer.type}"
    layer.python_param.param_str = WrappedParam(layer.type, wrapped, layer.name, role.options).to_param_str()
    layer.ClearField(field)
    layer.type = "Python"


def clipq_configs(net_param, source: str = "net") -> dict[str, LayerConfig]:
    """{layer name: LayerConfig} of the CLIP-Q layers of a net made by `to_clipq`."""
    configs = {}
    for layer in net_param.layer:
        if layer.type == "Python" and layer.python_param.layer in CLASS_TYPE:
            try:
                configs[layer.name] = LayerConfig.from_param_str(
                    layer.python_param.param_str, CLASS_TYPE[layer.python_param.layer])
            except ValueError as e:
                raise ClipqError(f"{source}: {e}") from None
    return configs


def convert_file(prototxt: str | os.PathLike, plan: dict[str, LayerPlan], output: str | os.PathLike) -> list[str]:
    """`clipq convert`: write the CLIP-Q version of a prototxt; return the converted layer names."""
    net = caffe_io.read_net_param(prototxt)
    converted = to_clipq(net, plan, str(prototxt))
    with atomic_write(output) as f:
        f.write(f"# CLIP-Q version of {Path(prototxt).name}, written by `clipq convert`.\n")
        f.write(str(converted))
    return list(plan)


def export(model: str | os.PathLike, weights: str | os.PathLike, output: str | os.PathLike) -> dict[str, dict]:
    """`clipq export`: plain caffemodel with the final quantized weights of a CLIP-Q caffemodel.

    `model` is the CLIP-Q prototxt the weights were trained with (it holds each layer's p and bits).
    Returns per-layer facts (p, bits, kept fraction) for reporting.
    """
    configs = clipq_configs(caffe_io.read_net_param(model), str(model))
    if not configs:
        raise ClipqError(f"{model}: has no CLIP-Q layers (make one with `clipq convert`)")
    trained = caffe_io.read_caffemodel(weights)
    found, summary = set(), {}
    for layer in trained.layer:
        config = configs.get(layer.name)
        if config is None:
            continue
        if not len(layer.blobs):
            raise ClipqError(f"{weights}: layer '{layer.name}' has no weights")
        w = caffe_io.blob_to_array(layer.blobs[0])
        q = prune_quant.clip_quantize(w, config.p, config.bits)
        caffe_io.set_blob(layer.blobs[0], q.weights)
        layer.type = config.type
        found.add(layer.name)
        summary[layer.name] = {"p": config.p, "bits": config.bits, "kept": float(q.mask.mean())}
    missing = sorted(set(configs) - found)
    if missing:
        raise ClipqError(f"{weights}: no weights for CLIP-Q layer(s) {', '.join(missing)} of {model}")
    caffe_io.write_caffemodel(trained, output)
    return summary
