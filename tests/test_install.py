"""The Caffe that `make install` built: pycaffe imports, a net built from a prototxt string trains."""

from __future__ import annotations

import numpy as np

TINY_NET = """
name: "tiny"
layer { name: "x" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 16 dim: 8 } shape { dim: 16 dim: 1 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


def test_pycaffe_and_caffe_io_import():
    import caffe
    import caffe.io

    assert hasattr(caffe, "SGDSolver") and hasattr(caffe, "Layer")
    assert caffe.io.datum_to_array(caffe.io.array_to_datum(np.ones((1, 2, 2), np.uint8))).sum() == 4


def test_sgd_solver_steps_a_net_built_from_a_prototxt_string(tmp_path):
    import caffe

    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\n'
        f'max_iter: 100\nsnapshot_after_train: false\nsolver_mode: CPU\nrandom_seed: 3\n')
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    first_loss = float(solver.net.blobs["loss"].data)
    solver.step(60)
    assert solver.iter == 61
    assert solver.net.params["fc"][0].data.shape == (1, 8)
    assert float(solver.net.blobs["loss"].data) < 0.2 * first_loss
