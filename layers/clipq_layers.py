"""CLIP-Q Caffe Python layers: drop-in `ClipQConvolution` and `ClipQInnerProduct`.

    layer { name: "conv1" type: "Python" bottom: "data" top: "conv1"
            param { lr_mult: 1 } param { lr_mult: 2 }
            python_param { module: "clipq_layers" layer: "ClipQConvolution"
                           param_str: '{"p": 0.2, "bits": 8, "convolution_param": {"num_output": 20, ...}}' } }

(`clipq convert` writes these from a plain prototxt and a (p, b) plan.) Blobs are those of Caffe's
layer: blobs[0] = full-precision weights, blobs[1] = bias, same shapes, so `--weights plain.caffemodel`,
snapshots and `--snapshot` resume work unchanged. Every forward recomputes the quantized weights from
the full-precision ones (CLIP-Q section 3.1) and runs Caffe's own layer with them; backward runs
Caffe's own backward and adds the weight gradient to the full-precision weights (straight-through),
so the solver's momentum, weight decay and lr policy apply to them and pruned weights can come back.
The bias is not quantized: blobs[1] is the inner Caffe layer's own bias blob.
"""

import caffe

from clipq import caffe_io, prune_quant
from clipq.plan import WRAPPED, LayerConfig


class _ClipQLayer(caffe.Layer):
    WRAPPED_TYPE = ""

    def setup(self, bottom, top):
        from google.protobuf import json_format

        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(f"{type(self).__name__} takes one bottom and one top")
        self.cfg = LayerConfig.from_param_str(self.param_str, self.WRAPPED_TYPE, type(self).__name__)
        field = WRAPPED[self.WRAPPED_TYPE]
        message = getattr(caffe_io.caffe_pb2().LayerParameter(), field)
        try:
            json_format.ParseDict(self.cfg.param, message)
        except json_format.ParseError as e:
            raise ValueError(f"{type(self).__name__}: bad {field} in param_str: {e}") from None
        self.inner = caffe_io.SingleLayerNet(self.WRAPPED_TYPE, field, message, bottom[0].data.shape, self.phase)
        weights = self.inner.params[0]
        self.blobs.add_blob(*weights.data.shape)
        self.blobs[0].data[...] = weights.data  # the filler's initial values; --weights overwrites them
        if len(self.inner.params) > 1:
            self.blobs.append(self.inner.params[1])

    def reshape(self, bottom, top):
        top[0].reshape(*self.inner.reshape(bottom[0].data.shape))

    def forward(self, bottom, top):
        prune_quant.clip_quantize(self.blobs[0].data, self.cfg.p, self.cfg.bits, out=self.inner.params[0].data)
        top[0].data[...] = self.inner.forward(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        dx = self.inner.backward(top[0].diff)
        inner_diff = self.inner.params[0].diff
        self.blobs[0].diff[...] += inner_diff  # straight-through: the quantized weights' gradient
        inner_diff[...] = 0
        if propagate_down[0]:
            bottom[0].diff[...] = dx


class ClipQConvolution(_ClipQLayer):
    """Caffe `Convolution` whose forward uses clip_quantize(W; p, bits), recomputed every minibatch."""

    WRAPPED_TYPE = "Convolution"


class ClipQInnerProduct(_ClipQLayer):
    """Caffe `InnerProduct` whose forward uses clip_quantize(W; p, bits), recomputed every minibatch."""

    WRAPPED_TYPE = "InnerProduct"
