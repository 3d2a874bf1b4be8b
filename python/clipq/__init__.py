"""clipq: CLIP-Q (Tung & Mori, CVPR 2018) pruning-quantization for Caffe models, run inside real Caffe."""

__version__ = "0.1.0"
