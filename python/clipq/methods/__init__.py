"""Compression methods, each one unit: its operator (pure numpy), its fine-tuning phases (the Caffe layer
kinds of layers/clipq_layers.py it uses, their options and state blobs), its export to the `.clipq` codec
and its size knob for `clipq compare`, registered once by name in `registry.METHODS`.

| method (NAME)             | phases (share of the fine-tuning iterations)                           | stored |
|---------------------------|-------------------------------------------------------------------------|--------|
| ClipQ (clipq, uniform)    | finetune (1): ClipQ layers, (p, b) per layer                            | b bits |
| DeepCompression           | prune (1/2, in R rounds): Masked, magnitude mask; share (1/2): Shared, k-means | b bits |
| Sequential                | prune (1/2): Masked, CLIP-Q's clip mask; share (1/2): CLIP-Q's intervals | b bits |
| Surgery (dns)             | surgery (1): Surgery layers, mask T spliced / pruned during training    | 8 bits |
| LearningCompression (lc)  | L0..L(K-1) (1/K each): LC layers; a C step before each and at the end   | 8 bits |
| LCQuantized (lc-quantized)| as lc; its C step also quantizes the kept weights (k-means)             | b bits |

Importing this package registers every method (the modules below, in the order `clipq compare` runs them).
"""

from clipq.methods import clipq, deep_compression, dns, lc  # noqa: F401 - each registers its methods
from clipq.methods.registry import METHODS

__all__ = ["METHODS"]
