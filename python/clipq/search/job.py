"""A search of a Caffe model as a job every executor runs: the layers checked, the subset LMDB and the
search net written once, and what a worker needs to build its evaluator (`subset_eval.SubsetEvaluator`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from clipq.caffe import caffe_io
from clipq.caffe.convert import compressible_layers, searched_layers
from clipq.search import subset_eval
from clipq.search.gp import Evaluation, SearchSettings
from clipq.search.log import layer_log, read_log
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError


@dataclass(frozen=True)
class SearchJob:
    eval_prototxt: str
    weights: str
    blobs: subset_eval.OutputBlobs
    out: str
    settings: SearchSettings
    model_id: str
    data: str  # the LMDB the subset is drawn from
    all_layers: tuple[str, ...]  # every compressible layer of the net, in order

    def make_evaluator(self):
        """The job's SubsetEvaluator: (layer, p, bits) -> (metric, benefit), built once per worker."""
        return subset_eval.SubsetEvaluator(self.eval_prototxt, self.weights, self.blobs, self.settings.subset,
                                           self.settings.metric)


def model_id(weights: str | os.PathLike) -> str:
    """Identifies the weights a log belongs to: name, size, and a hash of the first and last MB."""
    path = Path(weights)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(path.stat().st_size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return f"{path.name}:{path.stat().st_size}:{digest.hexdigest()[:16]}"


def capped_settings(settings: SearchSettings, entries: int, source: str,
                    log: Callable[[str], None]) -> SearchSettings:
    """The settings with the subset capped to the LMDB's `entries` (a multiple of the eval batch)."""
    if settings.subset <= entries:
        return settings
    capped = subset_eval.usable_count(entries)
    log(f"[search] {source} has {entries} images, fewer than --subset {settings.subset}: using {capped}")
    return replace(settings, subset=capped)


def prepare(model, weights, out, layers: list[str] | None, settings: SearchSettings, data: str | None,
            log: Callable[[str], None]) -> tuple[SearchJob, list[str]]:
    """Check the layers, write the subset LMDB and the search net; the job every worker runs."""
    out = Path(out)
    net = caffe_io.read_net_param(model)
    names = compressible_layers(net)
    layers = layers or searched_layers(net)
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ClipqError(f"{model}: no Convolution/InnerProduct layer(s) {', '.join(unknown)}; "
                         f"compressible layers: {', '.join(names)}")
    if settings.subset <= 0 or settings.subset % subset_eval.eval_batch(settings.subset):
        raise ClipqError(f"--subset must be at most {subset_eval.EVAL_BATCH} or a multiple of it, "
                         f"got {settings.subset}")
    source = str(Path(data or subset_eval.training_source(net, str(model))).resolve())
    settings = capped_settings(settings, caffe_io.lmdb_entries(source, "search's LMDB"), source, log)
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    subset = out / f"subset_{tag}_{settings.subset}_seed{settings.seed}_lmdb"
    if not subset.exists():
        subset_eval.write_subset(source, settings.subset, settings.seed, subset)
    eval_net, blobs = subset_eval.eval_net_param(net, subset.resolve(), settings.subset, str(model))
    eval_prototxt = out / "search_net.prototxt"
    with atomic_write(eval_prototxt) as f:
        f.write(str(eval_net))
    job = SearchJob(str(eval_prototxt), str(weights), blobs, str(out), settings, model_id(weights), source,
                    tuple(names))
    return job, layers


def job_layer_index(job: SearchJob, name: str) -> int:
    """A layer's position in the net: seeds its search, so a layer searched alone gets the same points."""
    return job.all_layers.index(name)


def load_histories(job: SearchJob, layers: list[str]) -> dict[str, list[Evaluation]]:
    """Every layer's logged evaluations (checked against the job's settings, weights and data)."""
    return {name: read_log(layer_log(Path(job.out), name), name, job.settings, job.model_id, job.data)
            for name in layers}
