"""`clipq compress` end to end on a Fashion-MNIST slice: every stage in real Caffe, resumable."""

from __future__ import annotations

from clipq import nets, pipeline, train
from clipq.search import SearchSettings

SOLVER = ('net: "{net}"\nbase_lr: {lr}\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
          'max_iter: {iters}\nsnapshot: 0\nsnapshot_prefix: "{prefix}"\nsolver_mode: CPU\nrandom_seed: 3\n')


def test_compress_end_to_end_decoded_model_scores_like_the_clipq_net(tmp_path, fashion_mnist_slices):
    data = nets.DataSpec(str(fashion_mnist_slices["train"]), str(fashion_mnist_slices["test"]), 64, 100,
                         (100, 1, 28, 28), scale=1 / 256)
    model = tmp_path / "train_val.prototxt"
    model.write_text(str(nets.train_val("mlp", nets.lenet300_100_body, data)))
    (tmp_path / "base_solver.prototxt").write_text(
        SOLVER.format(net=model, lr=0.01, iters=300, prefix=tmp_path / "base" / "mlp"))
    weights = train.train(tmp_path / "base_solver.prototxt", progress=False)
    (tmp_path / "finetune.prototxt").write_text(SOLVER.format(net="replaced", lr=0.001, iters=60, prefix="replaced"))

    config = pipeline.CompressConfig(model, weights, tmp_path / "finetune.prototxt", tmp_path / "out",
                                     settings=SearchSettings(iterations=4, initial=3, subset=500), jobs=2,
                                     progress=False)
    report = pipeline.run(config, log=lambda message: None)

    accuracy = report["accuracy"]
    assert accuracy["decoded"] == accuracy["clipq_net"]
    assert accuracy["baseline"] > 0.7 and accuracy["decoded"] > 0.25  # chance is 0.10; 4 evaluations per layer
    assert report["size"]["clipq_file_bytes"] == (tmp_path / "out" / "model.clipq").stat().st_size
    assert [row["layer"] for row in report["layers"]] == ["ip1", "ip2", "ip3", "Overall"]
    assert len(report["plots"]) == 3
    assert "| **Overall** |" in (tmp_path / "out" / "report.md").read_text()

    messages = []
    pipeline.run(config, log=messages.append)
    assert messages and all(m.endswith("up to date, skipped") for m in messages)
