"""An MPI rank for tests/test_data_parallel.py: data-parallel training, then this rank's weights to a file.

    mpirun -np N python mpi_rank_weights.py SOLVER WEIGHTS OUT_DIR P BITS

writes OUT_DIR/rank<r>.npz: `w` and `b`, the layer "fc"'s full-precision blobs, and `wq`, CLIP-Q's
pruned-quantized weights computed from them with (P, BITS).
"""

import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from clipq.caffe import data_parallel
from clipq.quant import prune_quant

solver_path, weights, out, p, bits = sys.argv[1:]
comm = MPI.COMM_WORLD
solver = data_parallel.fine_tune(Path(solver_path), comm, weights=Path(weights))
w, b = (np.array(blob.data) for blob in solver.net.params["fc"][:2])
wq = prune_quant.clip_quantize(w, float(p), int(bits)).weights
np.savez(Path(out) / f"rank{comm.rank}.npz", w=w, b=b, wq=wq)
