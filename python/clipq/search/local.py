"""The local executor: layers split round robin over worker processes, each evaluating its layers one point
at a time with its own SubsetEvaluator; a progress bar counts the logged evaluations. Workers die with the
run (`processes`): SIGTERM from the kernel if it is killed, terminate() if it stops."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from clipq.search.gp import Evaluation, SearchSettings, round_bits
from clipq.search.job import SearchJob
from clipq.search.log import LayerSearch, layer_log
from clipq.util.errors import ClipqError, Interrupted
from clipq.util.processes import end_with_parent


def search_layer(layer: str, layer_index: int, evaluate: Callable[[str, float, int], tuple[float, float]],
                 settings: SearchSettings, out: Path, model_id: str, data: str = "") -> list[Evaluation]:
    """Run (or resume) one layer's search to `settings.iterations` evaluations, one at a time; `data` names
    the images the error is measured on (recorded in the log's header)."""
    with LayerSearch(layer, layer_index, settings, out, model_id, data) as search:
        while not search.done:
            start = time.perf_counter()
            (p, b_raw), = search.suggest()
            error, benefit = evaluate(layer, p, round_bits(b_raw))
            search.record(p, b_raw, error, benefit, time.perf_counter() - start)
        return search.history


def _worker(job: SearchJob, layers: list[tuple[int, str]], parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    end_with_parent(signal.SIGTERM, parent)

    evaluate = job.make_evaluator()
    for index, layer in layers:
        search_layer(layer, index, evaluate, job.settings, Path(job.out), job.model_id, job.data)


def _logged(job: SearchJob, layers: list[tuple[int, str]]) -> int:
    total = 0
    for _, name in layers:
        path = layer_log(Path(job.out), name)
        if path.exists():
            total += max(sum(1 for line in path.read_text().splitlines() if line.strip()) - 1, 0)
    return min(total, len(layers) * job.settings.iterations)


def run(job: SearchJob, layers: list[tuple[int, str]], jobs: int, progress: bool) -> None:
    """Layers split round robin over `jobs` processes; a progress bar counts the logged evaluations."""
    groups = [layers[i::jobs] for i in range(max(1, min(jobs, len(layers))))]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(job, group, os.getpid())) for group in groups]
    bar = tqdm(total=len(layers) * job.settings.iterations, initial=_logged(job, layers), unit="eval",
               desc=f"search ({len(layers)} layers, {len(groups)} jobs)", disable=not progress)
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            time.sleep(0.5)
            bar.update(_logged(job, layers) - bar.n)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; every finished evaluation is logged: rerun the same command to resume") \
            from None
    finally:
        _end(procs)
        bar.update(_logged(job, layers) - bar.n)
        bar.close()
    failed = [proc.exitcode for proc in procs if proc.exitcode]
    if failed:
        raise ClipqError(f"a search process failed (exit code {failed[0]}); see its error above. "
                         "Finished evaluations are logged: fix the cause and rerun to resume")


def _end(procs: list[multiprocessing.Process], grace: float = 10.0) -> None:
    """Terminate the workers still running and reap them all (killed if they ignore SIGTERM)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(grace)
            if proc.is_alive():
                proc.kill()
                proc.join()
