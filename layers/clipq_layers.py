"""clipq's Caffe Python layers: CLIP-Q's `ClipQConvolution` / `ClipQInnerProduct`, and the baselines'.

    layer { name: "conv1" type: "Python" bottom: "data" top: "conv1"
            param { lr_mult: 1 } param { lr_mult: 2 }
            python_param { module: "clipq_layers" layer: "ClipQConvolution"
                           param_str: '{"p": 0.2, "bits": 8, "convolution_param": {"num_output": 20, ...}}' } }

(`clipq convert` writes these from a plain prototxt and a (p, b) plan; `clipq compare` writes the
baselines'.) Every layer wraps Caffe's own Convolution / InnerProduct: each forward computes the weights
the method uses from the layer's blobs into the inner Caffe layer's weight blob and runs that layer;
backward runs Caffe's backward. The inner layer shares (pycaffe patch: Blob.share_data / share_diff) the
outer layer's bottom, top and bias blobs, so activations, their gradients and the bias are never copied;
for a straight-through method (CLIP-Q, DNS) it also writes its weight gradient straight into the
learnable blob's diff, where Caffe's layers accumulate it. The other methods get the gradient through
`weight_gradient`. The bias is never compressed.

| kind     | blobs                                   | forward weights        | learnable weights' gradient          |
|----------|-----------------------------------------|------------------------|--------------------------------------|
| ClipQ    | W, bias [, passes (gradual pruning)]    | clip_quantize(W; p, b) | all of it (straight-through, CLIP-Q) |
| Masked   | W, bias, mask                           | W * mask               | masked (fixed mask: DC, sequential)  |
| Shared   | codebook, bias, codes                   | codebook[codes]        | summed per centroid (DC eq. 3)       |
| Surgery  | W, bias, mask T, [iteration, mu, sigma] | W * T; T updated (DNS) | all of it (pruned weights splice back) |
| LC       | W, bias, theta, lambda                  | W                      | + mu (W - theta) - lambda (LC L step) |

State blobs (after W and bias) have lr_mult 0 and decay_mult 0: the solver never touches them, snapshots
and caffemodels keep them. Blobs 0 and 1 of ClipQ, Masked, Surgery and LC are Caffe's own, so their
weights are in Caffe's shapes. A layer whose input needs no gradient (a first layer) stops computing it.
"""

import json

import caffe
import numpy as np
from google.protobuf import json_format

from clipq.caffe import caffe_io, distill
from clipq.caffe.param_str import WRAPPED, LayerConfig, WrappedParam
from clipq.methods import clipq as clipq_method
from clipq.methods import deep_compression, dns, lc
from clipq.methods.base import shared
from clipq.quant import prune_quant
from clipq.util.parallel import add_and_clear


class _WrappedLayer(caffe.Layer):
    """Caffe's layer of WRAPPED_TYPE run on the weights `forward_weights` computes."""

    WRAPPED_TYPE = ""
    KIND = ""
    OPTIONS: tuple[str, ...] = ()
    # The learnable weights take the forward weights' gradient unchanged: Caffe's layer adds it straight
    # into the learnable blob's diff (the solver clears it every iteration), no `weight_gradient`.
    STRAIGHT_THROUGH = False

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(f"{type(self).__name__} takes one bottom and one top, got {len(bottom)} and {len(top)}")
        self.parse(self.param_str)
        self.field = WRAPPED[self.WRAPPED_TYPE]
        self.message = getattr(caffe_io.caffe_pb2().LayerParameter(), self.field)
        try:
            json_format.ParseDict(self.wrapped.param, self.message)
        except json_format.ParseError as e:
            raise ValueError(f"{self.KIND} layer '{self.wrapped.name}': bad {self.field} in param_str: {e}") from None
        self.inner = self._inner_net(bottom[0].data.shape, input_grad=True)
        for array in self.initial_blobs([blob.data for blob in self.inner.params]):
            self.blobs.add_blob(*array.shape)  # --weights and snapshots overwrite these
            self.blobs[-1].data[...] = array

    def parse(self, text: str) -> None:
        self.wrapped = WrappedParam.from_param_str(text, self.WRAPPED_TYPE, self.OPTIONS, self.KIND)
        self.options = self.wrapped.options

    def initial_blobs(self, inner: list[np.ndarray]) -> list[np.ndarray]:
        """The layer's blobs before any weights are loaded: the filler's weights and bias by default."""
        return [np.array(a) for a in inner]

    def _inner_net(self, shape, input_grad: bool) -> caffe_io.SingleLayerNet:
        return caffe_io.SingleLayerNet(self.WRAPPED_TYPE, self.field, self.message, shape, self.phase, input_grad)

    def reshape(self, bottom, top):
        top[0].reshape(*self.inner.reshape(bottom[0].data.shape))

    def forward(self, bottom, top):
        self.inner.attach(bottom[0], top[0])
        params = self.inner.params
        if len(params) > 1:  # the bias is not compressed: Caffe's layer uses and trains the blob itself
            params[1].share_data(self.blobs[1])
            params[1].share_diff(self.blobs[1])
        if self.STRAIGHT_THROUGH:
            params[0].share_diff(self.blobs[0])
        self.forward_weights(params[0].data)
        self.inner.forward()

    def forward_weights(self, out: np.ndarray) -> None:
        raise NotImplementedError

    def weight_gradient(self, grad: np.ndarray) -> None:
        """Add what the forward weights' gradient `grad` (the inner blob's diff) gives the learnable
        blobs, and clear `grad` (Caffe's backward accumulates into it)."""
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        if self.inner.input_grad and not propagate_down[0]:
            # Caffe never asks this layer for its input's gradient (e.g. the first layer): from the next
            # iteration on, an inner net that does not compute it (for conv1, that is most of backward).
            next_inner = self._inner_net(bottom[0].data.shape, input_grad=False)
        else:
            next_inner = None
        self.inner.backward()
        if not self.STRAIGHT_THROUGH:
            self.weight_gradient(self.inner.params[0].diff)
        if next_inner is not None:
            self.inner = next_inner


class _ClipQ(_WrappedLayer):
    KIND = "CLIP-Q"
    STRAIGHT_THROUGH = True  # pruned weights may come back

    def parse(self, text: str) -> None:
        self.cfg = LayerConfig.from_param_str(text, self.WRAPPED_TYPE)
        self.last = None  # the operator's last result
        self.wrapped = WrappedParam(self.cfg.type, self.cfg.param, self.cfg.name)

    def initial_blobs(self, inner):
        counter = [np.zeros(1, np.float32)] if self.cfg.ramp else []  # training passes so far (gradual pruning)
        return [np.array(a) for a in inner] + counter

    def forward_weights(self, out):
        p = self.cfg.p
        if self.cfg.ramp:
            passes = self.blobs[-1].data
            p = clipq_method.ramped_rate(self.cfg.p, int(passes[0]), self.cfg.ramp)
            if self.phase == caffe.TRAIN:  # the TEST net shares the counter: it only reads it
                passes[0] += 1
        # the last result brackets this step's selection (fine-tuning moves the clips little) and lends
        # its codes buffer
        self.last = prune_quant.clip_quantize(self.blobs[0].data, p, self.cfg.bits, out=out, previous=self.last)


class _Masked(_WrappedLayer):
    KIND = "Masked"

    def initial_blobs(self, inner):
        return [np.array(a) for a in inner] + [np.ones(inner[0].shape, np.float32)]

    def forward_weights(self, out):
        np.multiply(self.blobs[0].data, self.blobs[-1].data, out=out)

    def weight_gradient(self, grad):
        grad *= self.blobs[-1].data
        add_and_clear(self.blobs[0].diff, grad)


class _Shared(_WrappedLayer):
    KIND = "Shared"
    OPTIONS = ("bits",)

    def initial_blobs(self, inner):
        levels = 2 ** int(self.options["bits"]) - 1
        codes = np.zeros(inner[0].shape, np.float32)
        return [np.zeros(levels, np.float32)] + [np.array(a) for a in inner[1:]] + [codes]

    def forward_weights(self, out):
        out[...] = shared(self.blobs[-1].data, self.blobs[0].data)

    def weight_gradient(self, grad):
        codebook = self.blobs[0]
        codebook.diff[...] += deep_compression.centroid_gradient(grad, self.blobs[-1].data, codebook.data.size)
        grad[...] = 0


class _Surgery(_WrappedLayer):
    KIND = "Surgery"
    STRAIGHT_THROUGH = True  # every weight learns: a pruned one can be spliced back
    OPTIONS = ("c_rate", "iter_stop", "gamma", "power", "seed")

    def initial_blobs(self, inner):
        return [np.array(a) for a in inner] + [np.ones(inner[0].shape, np.float32), np.zeros(3, np.float32)]

    def forward_weights(self, out):
        mask, state = self.blobs[-2].data, self.blobs[-1].data
        if self.phase == caffe.TRAIN:  # the TEST net shares these blobs: it only reads them
            iteration = int(state[0])
            chance = dns.surgery_probability(iteration, float(self.options.get("gamma", dns.GAMMA)),
                                                 float(self.options.get("power", dns.POWER)))
            # the draw depends on (seed, iteration) only, so a run resumed from a snapshot draws as the
            # uninterrupted one would
            draw = np.random.default_rng([int(self.options.get("seed", 0)), iteration]).random()
            if iteration < int(self.options["iter_stop"]) and draw < chance:
                t = dns.threshold(float(state[1]), float(state[2]), float(self.options["c_rate"]))
                mask[...] = dns.update_mask(self.blobs[0].data, mask, t)
            state[0] = iteration + 1
        np.multiply(self.blobs[0].data, mask, out=out)


class _LC(_WrappedLayer):
    KIND = "LC"
    OPTIONS = ("mu",)

    def initial_blobs(self, inner):
        return [np.array(a) for a in inner] + [np.zeros(inner[0].shape, np.float32)] * 2

    def forward_weights(self, out):
        out[...] = self.blobs[0].data

    def weight_gradient(self, grad):
        w = self.blobs[0]
        grad += lc.penalty_gradient(w.data, self.blobs[-2].data, self.blobs[-1].data, float(self.options["mu"]))
        add_and_clear(w.diff, grad)


class SoftTargetLoss(caffe.Layer):
    """Distillation's soft-target loss (clipq.caffe.distill): bottoms the student's and the teacher's class
    scores, top T^2 * mean KL(softmax(teacher / T) || softmax(student / T)); the gradient goes to the student
    only. param_str: {"temperature": T}."""

    def setup(self, bottom, top):
        if len(bottom) != 2 or len(top) != 1:
            raise ValueError(f"SoftTargetLoss takes the student's and the teacher's scores and gives one loss, got "
                             f"{len(bottom)} bottoms and {len(top)} tops")
        try:
            self.temperature = float(json.loads(self.param_str)["temperature"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f'SoftTargetLoss param_str: expected {{"temperature": T}}, got {self.param_str!r}') \
                from None
        if not self.temperature > 0:
            raise ValueError(f"SoftTargetLoss: the temperature must be > 0, got {self.temperature}")

    def reshape(self, bottom, top):
        if bottom[0].data.shape != bottom[1].data.shape:
            raise ValueError(f"SoftTargetLoss: student scores {bottom[0].data.shape} and teacher scores "
                             f"{bottom[1].data.shape} differ")
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[...], self.grad = distill.soft_target_loss(bottom[0].data, bottom[1].data, self.temperature)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.grad * top[0].diff  # the loss weight arrives as the top's diff


def _concrete(kind_class, wrapped_type):
    return type(f"{kind_class.__name__[1:]}{wrapped_type}", (kind_class,), {"WRAPPED_TYPE": wrapped_type})


ClipQConvolution = _concrete(_ClipQ, "Convolution")
ClipQInnerProduct = _concrete(_ClipQ, "InnerProduct")
MaskedConvolution = _concrete(_Masked, "Convolution")
MaskedInnerProduct = _concrete(_Masked, "InnerProduct")
SharedConvolution = _concrete(_Shared, "Convolution")
SharedInnerProduct = _concrete(_Shared, "InnerProduct")
SurgeryConvolution = _concrete(_Surgery, "Convolution")
SurgeryInnerProduct = _concrete(_Surgery, "InnerProduct")
LCConvolution = _concrete(_LC, "Convolution")
LCInnerProduct = _concrete(_LC, "InnerProduct")
