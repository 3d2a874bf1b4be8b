"""`clipq search`: search every layer's (p, b) on a Caffe model (CLIP-Q section 3.2) and write the plan.

The layers are independent: `local` runs them in worker processes, `ray_executor` on Ray actors; both drive
the same per-layer `log.LayerSearch` with the GP-EI of `gp`, so a search resumes under either. The best
point of each layer becomes the plan (`plan.yaml`); `plots/<layer>.png` shows each layer's search like the
paper's Fig. 3.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from clipq.plan import LayerPlan, save_plan
from clipq.search import local, ray_executor
from clipq.search.gp import SearchSettings, best
from clipq.search.job import job_layer_index, load_histories, prepare
from clipq.search.log import file_stem
from clipq.search.plots import plot_layer
from clipq.util.lock import output_directory


def run(model, weights, out, layers: list[str] | None = None, settings: SearchSettings = SearchSettings(),
        jobs: int = 1, data: str | None = None, progress: bool = True,
        log: Callable[[str], None] = lambda message: print(message, file=sys.stderr), ray: str | None = None,
        batch: int | None = None) -> dict[str, LayerPlan]:
    """`clipq search`: search every (or the given) Convolution / InnerProduct layer; write plan.yaml and
    the plots under `out`; return the plan.

    `jobs` local processes evaluate, or, with `ray` (an address or 'local'), `jobs` Ray actors
    (`ray_executor`; `batch` points per layer at a time, default workers // unfinished layers).

    The error is measured on a random subset of `data` (an LMDB: held-out validation images), or of the
    net's TRAIN-phase LMDB when `data` is None (the paper's choice). A subset larger than the LMDB is
    capped to it (with a message).
    """
    if ray and ray != ray_executor.LOCAL:
        ray_executor.check_reachable(ray)  # before anything is written
    with output_directory(out, log):
        job, layers = prepare(model, weights, out, layers, settings, data, log)
        indexed = [(job_layer_index(job, name), name) for name in layers]
        if ray:
            ray_executor.run(job, indexed, ray, jobs, batch, progress)
        else:
            local.run(job, indexed, jobs, progress)
        histories = load_histories(job, layers)
        plan = {name: LayerPlan(best(h).p, best(h).bits) for name, h in histories.items()}
        for name, history in histories.items():
            plot_layer(name, history, Path(out) / "plots" / f"{file_stem(name)}.png", job.settings.lam,
                       job.settings.metric)
        save_plan(plan, Path(out) / "plan.yaml", extra={"lambda": job.settings.lam, "data": job.data, "searched": {
            name: {"objective": round(best(h).objective, 4), "error": round(best(h).error, 3),
                   "benefit": round(best(h).benefit, 6)} for name, h in histories.items()}})
    return plan
