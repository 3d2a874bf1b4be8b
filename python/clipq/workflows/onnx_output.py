"""The ONNX file `clipq compress` and `clipq zoo` write next to their `.clipq` file, and its check in onnxruntime.

The file is `clipq export-onnx`'s (`compressed_model.export_onnx`, opset 13): the compressed layers as uint8
codes + codebook, the rest dense. A net the exporter refuses gives no file and a reason, and the run goes on.

- `for_train_val` (`clipq compress`): the deploy is derived from the train_val (`caffe.deploy_net`) and written
  next to the file; onnxruntime classifies the TEST LMDB's images, read and transformed as Caffe's Data layer
  does, and its top-1 is compared image by image with Caffe's on the decoded caffemodel.
- `for_deploy` (`clipq zoo`): the given deploy; onnxruntime runs the comparison's inputs and its last output is
  compared with the decoded caffemodel's and the original's (top-1 agreement, largest difference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io, deploy_net, onnx_export
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model


def export(deploy: Path, clipq: Path, output: Path) -> dict:
    """Write the ONNX model of `deploy` with the `.clipq` file's weights; what was written, or {"refused":
    reason} (no file then)."""
    try:
        written = compressed_model.export_onnx(deploy, output, clipq=clipq)
    except ClipqError as e:
        output.unlink(missing_ok=True)  # an earlier run's file is not this model's
        return {"refused": str(e)}
    return {"file": str(written.path), "bytes": written.bytes, "dense_bytes": written.dense_bytes,
            "opset": onnx_export.DEFAULT_OPSET, "compressed": written.compressed,
            "outputs": written.outputs}


def file_summary(onnx: dict, name: str) -> str:
    """What was written, for the reports: `name` (the file's name as the report shows it), its size, how many
    layers kept codes + codebook, and the dense export's size."""
    layers = len(onnx["compressed"])
    return (f"ONNX (opset {onnx['opset']}): {name} {onnx['bytes']:,} bytes, {layers} "
            f"layer{'s' if layers != 1 else ''} as uint8 codes + codebook (dense float32 ONNX "
            f"{onnx['dense_bytes']:,} bytes); ")


class Session:
    """An onnxruntime session of an ONNX file whose inputs have a fixed batch (the deploy's): `run` takes any
    number of samples, a batch at a time, the last one padded with zeros."""

    def __init__(self, path: Path, outputs: list[str]):
        import onnx  # lazy: only the ONNX output needs it (a second to import)
        import onnxruntime  # lazy: as onnx

        model = onnx.load(str(path))
        declared = {out.name for out in model.graph.output}
        for name in outputs:  # a blob a later layer reads is no graph output: make it one to read it
            if name not in declared:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.session = onnxruntime.InferenceSession(model.SerializeToString(),
                                                    providers=["CPUExecutionProvider"])
        self.batch = {i.name: i.shape[0] for i in self.session.get_inputs()}
        self.outputs = outputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(next(iter(inputs.values())))
        batch = next(iter(self.batch.values()))
        if not isinstance(batch, int) or batch < 1:
            batch = count
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start in range(0, count, batch):
            feed = {}
            for name, array in inputs.items():
                part = np.ascontiguousarray(array[start:start + batch], np.float32)
                if len(part) < batch:
                    part = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], np.float32)])
                feed[name] = part
            n = min(batch, count - start)
            for name, value in zip(self.outputs, self.session.run(self.outputs, feed)):
                parts[name].append(value[:n])
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _runtime_failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"onnxruntime failed: {first}"


def for_train_val(train_val: Path, clipq: Path, decoded: Path, output: Path, deploy_path: Path) -> dict:
    """`clipq compress`'s ONNX file: the deploy of the train_val (written to `deploy_path`), the ONNX model
    (`output`), and its top-1 in onnxruntime on the TEST LMDB next to Caffe's on the decoded caffemodel."""
    try:
        deploy = deploy_net.from_train_val(caffe_io.read_net_param(train_val), str(train_val))
    except ClipqError as e:
        output.unlink(missing_ok=True)
        return {"refused": f"no deploy net can be derived from the train_val: {e}"}
    deploy_net.write(deploy, deploy_path, f"the deploy of {train_val} (TEST phase, Input for its Data layer, no "
                                          f"label): the net {output.name} was made from")
    info = {**export(deploy_path, clipq, output), "deploy": str(deploy_path)}
    if "refused" not in info:
        info["top1"] = test_top1(deploy, train_val, output, decoded)
    return info


def test_top1(deploy: deploy_net.Deploy, train_val: Path, onnx_file: Path, decoded: Path) -> dict:
    """Top-1 of the ONNX model in onnxruntime and of the decoded caffemodel in Caffe on the TEST LMDB's images,
    each image once; {"skipped": reason} if it cannot be measured."""
    if deploy.scores is None:
        return {"skipped": f"{train_val} has no top-1 Accuracy layer to say which blob holds the scores"}
    try:
        session = Session(onnx_file, [deploy.scores])
        right = []
        for images, labels in deploy_net.batches(deploy.data, str(train_val)):
            scores = session.run({deploy.input: images})[deploy.scores]
            right.append(scores.reshape(len(scores), -1).argmax(axis=1) == labels)
    except ClipqError as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class; the run goes on
        return {"skipped": _runtime_failure(e)}
    onnx_right = np.concatenate(right)
    caffe_right = caffe_io.correct_per_image(train_val, decoded)
    if caffe_right.size != onnx_right.size:
        return {"skipped": f"Caffe read {caffe_right.size} test images, clipq {onnx_right.size}"}
    return {"images": int(onnx_right.size), "onnx": float(onnx_right.mean()), "caffe": float(caffe_right.mean()),
            "onnx_correct": int(onnx_right.sum()), "caffe_correct": int(caffe_right.sum()),
            "differing_images": int(np.sum(onnx_right != caffe_right)),
            "equal": bool(onnx_right.sum() == caffe_right.sum())}


def for_deploy(deploy: Path, clipq: Path, output: Path, inputs: dict[str, np.ndarray], last: str,
               original: np.ndarray, decoded: np.ndarray) -> dict:
    """`clipq zoo`'s ONNX file: the ONNX model of the deploy (`output`) and its output `last` in onnxruntime on
    the comparison's inputs, against the decoded caffemodel's (`decoded`) and the original's (`original`)."""
    info = export(deploy, clipq, output)
    if "refused" in info:
        return info
    try:
        ours = Session(output, [last]).run(inputs)[last]
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class; the run goes on
        return {**info, "comparison": {"skipped": _runtime_failure(e)}}
    diff = np.abs(ours.astype(np.float64) - decoded.astype(np.float64))
    compared = {"output": last, "samples": len(ours), "max_abs_diff_decoded": float(diff.max(initial=0.0))}
    if ours.ndim >= 2:  # as the zoo's comparison counts it: the argmax over axis 1, every position
        top1 = np.argmax(ours, axis=1)
        same_decoded, same_original = top1 == np.argmax(decoded, axis=1), top1 == np.argmax(original, axis=1)
        compared |= {"compared": int(top1.size), "agreeing_decoded": int(same_decoded.sum()),
                     "agreeing_original": int(same_original.sum()),
                     "top1_agreement_original": float(same_original.mean())}
    return {**info, "comparison": compared}
