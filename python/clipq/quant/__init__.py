"""The CLIP-Q operator: clip, partition, quantize (section 3.1). `prune_quant` is the numpy reference and the
dispatcher, `kernel` the O(n) numba kernel, `partition` the maths both share. Pure numpy (and numba)."""
