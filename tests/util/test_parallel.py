"""Fixed-chunk parallelism: chunk edges and the layers' gradient hand-off."""

from __future__ import annotations

import numpy as np

from clipq.util import parallel


def test_add_and_clear_moves_a_gradient_in_parallel_chunks(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN", 1)
    dst, src = np.ones(200_003, np.float32), np.arange(200_003, dtype=np.float32)
    expected = dst + src
    parallel.add_and_clear(dst, src)
    assert np.array_equal(dst, expected) and not src.any()


def test_chunks_are_fixed_and_cover_every_element(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN", 10)
    assert list(parallel.chunk_bounds(5)) == [0, 5]  # below the threshold: one serial chunk
    bounds = parallel.chunk_bounds(1000)
    assert bounds[0] == 0 and bounds[-1] == 1000 and np.all(np.diff(bounds) > 0)
    assert np.array_equal(bounds, parallel.chunk_bounds(1000))  # the same every time: results never depend on it
