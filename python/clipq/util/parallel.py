"""Fixed-chunk parallelism for clipq's numba kernels (the operator, the codec, the layers' gradients).

Work is cut into fixed chunks whose partial results are combined in chunk order, so a result never
depends on thread scheduling. Below PARALLEL_MIN elements one chunk runs serially: threads would cost
more than they save (and contend with Caffe's BLAS threads).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

PARALLEL_MIN = 1 << 20


def chunk_bounds(n: int) -> np.ndarray:
    """Chunk edges over n elements: one chunk (serial) below PARALLEL_MIN, else 4 per thread."""
    chunks = 1 if n < PARALLEL_MIN else 4 * numba.get_num_threads()
    return np.linspace(0, n, chunks + 1).astype(np.int64)


@njit(cache=True)
def _add_and_clear_chunk(dst, src):
    for i in range(dst.size):
        dst[i] += src[i]
        src[i] = 0


@njit(parallel=True, cache=True)
def _add_and_clear(dst, src, bounds):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _add_and_clear_chunk(dst, src)
        return
    for c in prange(bounds.size - 1):
        _add_and_clear_chunk(dst[bounds[c]:bounds[c + 1]], src[bounds[c]:bounds[c + 1]])


def add_and_clear(dst: np.ndarray, src: np.ndarray) -> None:
    """dst += src; src = 0 (one parallel pass; float32 arrays of the same size): how a Caffe layer hands a
    gradient it computed into a learnable blob's diff."""
    d, s = dst.reshape(-1), src.reshape(-1)
    _add_and_clear(d, s, chunk_bounds(d.size))
