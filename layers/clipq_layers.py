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
The bias is not quantized. A layer whose input needs no gradient (a first layer) stops computing it.
"""

import caffe

from clipq import caffe_io, prune_quant
from clipq._kernels import add_and_clear
from clipq.plan import WRAPPED, LayerConfig


class _ClipQLayer(caffe.Layer):
    WRAPPED_TYPE = ""

    def setup(self, bottom, top):
        from google.protobuf import json_format

        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(f"{type(self).__name__} takes one bottom and one top, got {len(bottom)} and {len(top)}")
        self.cfg = LayerConfig.from_param_str(self.param_str, self.WRAPPED_TYPE)
        self.field = WRAPPED[self.WRAPPED_TYPE]
        self.message = getattr(caffe_io.caffe_pb2().LayerParameter(), self.field)
        try:
            json_format.ParseDict(self.cfg.param, self.message)
        except json_format.ParseError as e:
            raise ValueError(f"CLIP-Q layer '{self.cfg.name}': bad {self.field} in param_str: {e}") from None
        self.inner = self._inner_net(bottom[0].data.shape, input_grad=True)
        for blob in self.inner.params:  # the filler's initial values; --weights overwrites them
            self.blobs.add_blob(*blob.data.shape)
            self.blobs[-1].data[...] = blob.data

    def _inner_net(self, shape, input_grad: bool) -> caffe_io.SingleLayerNet:
        return caffe_io.SingleLayerNet(self.WRAPPED_TYPE, self.field, self.message, shape, self.phase, input_grad)

    def reshape(self, bottom, top):
        top[0].reshape(*self.inner.reshape(bottom[0].data.shape))

    def forward(self, bottom, top):
        weights = self.inner.params
        prune_quant.clip_quantize(self.blobs[0].data, self.cfg.p, self.cfg.bits, out=weights[0].data)
        if len(weights) > 1:
            weights[1].data[...] = self.blobs[1].data  # the bias is not quantized
        top[0].data[...] = self.inner.forward(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        if self.inner.input_grad and not propagate_down[0]:
            # Caffe never asks this layer for its input's gradient (e.g. the first layer): from the next
            # iteration on, an inner net that does not compute it (for conv1, that is most of backward).
            next_inner = self._inner_net(bottom[0].data.shape, input_grad=False)
        else:
            next_inner = None
        dx = self.inner.backward(top[0].diff)
        # Straight-through: the quantized weights' gradient goes to the full-precision weights (adding,
        # as Caffe's layers do); the inner ones are cleared because Caffe's backward accumulates into them.
        for outer, inner in zip(self.blobs, self.inner.params):
            add_and_clear(outer.diff, inner.diff)
        if propagate_down[0]:
            bottom[0].diff[...] = dx
        if next_inner is not None:
            self.inner = next_inner


class ClipQConvolution(_ClipQLayer):
    """Caffe `Convolution` whose forward uses clip_quantize(W; p, bits), recomputed every minibatch."""

    WRAPPED_TYPE = "Convolution"


class ClipQInnerProduct(_ClipQLayer):
    """Caffe `InnerProduct` whose forward uses clip_quantize(W; p, bits), recomputed every minibatch."""

    WRAPPED_TYPE = "InnerProduct"
