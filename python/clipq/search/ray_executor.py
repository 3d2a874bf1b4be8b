"""The search on a Ray cluster: evaluations run on long-lived Ray actors, the GP-EI of every layer here.

Each actor builds its own `SubsetEvaluator` once, from the search net's prototxt and the caffemodel's path
(a path every node must see: weights are read from disk, never pickled per call), then answers
(layer, p, bits) -> (error %, c_i). The driver (this process) holds every layer's `LayerSearch`: it asks a
layer for its next points (a batch of several with GPyOpt's local penalization when there are more workers
than unfinished layers), hands them to idle actors and appends each result to the layer's `.jsonl` log, in
iteration order and exactly once, so the logs resume under either executor. Actors are restarted by Ray
when their process dies and the evaluation in flight is re-run (`max_restarts`, `max_task_retries`).

`--ray local` starts a one-machine Ray confined to 127.0.0.1 (no dashboard, no usage reporting, a random
auth token, its files in a temporary directory); `--ray HOST:PORT` joins a cluster started by `ray start`.
Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from clipq.search.gp import round_bits
from clipq.search.job import SearchJob
from clipq.search.log import LayerSearch
from clipq.util.errors import ClipqError, Interrupted

LOCAL = "local"
RESTARTS = 3  # a dead actor's process is replaced (and its evaluation re-run) up to this many times
LOCAL_OBJECT_STORE = 256 << 20  # results are a few floats: no need for Ray's default of 30% of RAM


class Evaluator:
    """What each Ray actor holds: an evaluator made once by `make` (e.g. a SubsetEvaluator)."""

    def __init__(self, make: Callable[[], Callable[[str, float, int], tuple[float, float]]]):
        self._evaluate = make()

    def evaluate(self, layer: str, p: float, bits: int) -> tuple[float, float]:
        return self._evaluate(layer, p, bits)


def loopback_env(tmpdir: str) -> dict[str, str]:
    """Environment of a Ray that stays on this machine: no usage reporting, token auth, files in `tmpdir`."""
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": tmpdir}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address (Ray itself retries for minutes)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Something listens at a cluster address `HOST:PORT` (or `ray://HOST:PORT`): one line naming the address
    after `timeout` seconds, not Ray's minutes of retries. Other forms ('auto') are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClipqError(f"--ray {address}: nothing answers there within {timeout:g} s ({e.strerror or e}); start "
                         "the cluster with `ray start --head`, or check the address") from None


@contextlib.contextmanager
def connected(address: str, workers: int) -> Iterator[None]:
    """Ray for the duration: a local loopback-only one (`address` 'local', `workers` CPUs) or the cluster at
    `address`; left as it is if this process is already connected."""
    if address != LOCAL:
        check_reachable(address)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield
        return
    if importlib.util.find_spec("ray") is None:
        raise ClipqError("--ray needs Ray: pip install -r requirements.txt (ray is pinned there)")
    with contextlib.ExitStack() as stack:
        if address == LOCAL:  # before Ray's import: it reads the auth settings then
            tmpdir = tempfile.mkdtemp(prefix="clipq-ray-")
            stack.callback(shutil.rmtree, tmpdir, ignore_errors=True)
            stack.enter_context(_environ(loopback_env(tmpdir)))
        import ray  # lazy: Ray is optional, and only --ray needs it

        try:
            if address == LOCAL:
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=workers,
                         object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise ClipqError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head`") \
                from None
        stack.callback(ray.shutdown)
        yield


def start_actors(make: Callable, workers: int) -> list:
    """`workers` Ray actors, each holding `make()`; one CPU each."""
    import ray  # lazy: Ray is optional, and only --ray needs it

    actor = ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)(Evaluator)
    return [actor.remote(make) for _ in range(workers)]


@dataclass
class _Point:
    search: LayerSearch
    p: float
    b_raw: float
    start: float  # when its batch was asked for: seconds count the suggestion, as the local executor's
    result: tuple[float, float] | None = None
    seconds: float = 0.0


def drive(searches: list[LayerSearch], actors: list, batch: int | None = None,
          logged: Callable[[int], None] = lambda n: None) -> None:
    """Run every layer search to its iterations on the actors. A layer without points in flight gets its next
    batch: `batch` points, or (None) max(1, actors // unfinished layers); results are logged in iteration order;
    `logged(n)` is called after each n logged evaluations."""
    import ray  # lazy: Ray is optional, and only --ray needs it

    idle, queue, running = list(actors), deque(), {}
    in_flight: dict[int, deque[_Point]] = {id(s): deque() for s in searches}
    while not all(s.done for s in searches):
        left = [s for s in searches if not s.done]
        for search in left:
            if not in_flight[id(search)]:
                start = time.perf_counter()
                size = batch or max(1, len(actors) // len(left))
                points = [_Point(search, p, b_raw, start) for p, b_raw in search.suggest(size)]
                in_flight[id(search)].extend(points)
                queue.extend(points)
        while queue and idle:
            point, actor = queue.popleft(), idle.pop()
            running[actor.evaluate.remote(point.search.layer, point.p, round_bits(point.b_raw))] = (actor, point)
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            actor, point = running.pop(ref)
            idle.append(actor)
            point.result = _result(ray, ref)
            point.seconds = time.perf_counter() - point.start
        for search in left:
            logged(_log_finished(in_flight[id(search)]))


def _result(ray, ref) -> tuple[float, float]:
    try:
        return tuple(ray.get(ref))
    except ray.exceptions.RayActorError as e:
        raise ClipqError(f"a Ray worker could not start, or died more than {RESTARTS} times ({e}); finished "
                         "evaluations are logged: fix the cause and rerun to resume") from None


def _log_finished(points: deque[_Point]) -> int:
    """Log a layer's finished points up to its first unfinished one (iterations stay in order)."""
    count = 0
    while points and points[0].result is not None:
        point = points.popleft()
        point.search.record(point.p, point.b_raw, *point.result, point.seconds)
        count += 1
    return count


def run(job: SearchJob, layers: list[tuple[int, str]], address: str, workers: int, batch: int | None = None,
        progress: bool = True, make: Callable | None = None) -> None:
    """`clipq search --ray ADDRESS`: search `layers` ((index, name)) of `job` on `workers` Ray actors, each
    holding a SubsetEvaluator of the job (or `make()`), resuming from and appending to the job's logs."""
    make = make or job.make_evaluator
    with connected(address, workers), contextlib.ExitStack() as stack:
        import ray  # lazy: Ray is optional, and only --ray needs it

        cpus = int(ray.cluster_resources().get("CPU", 0))
        if workers > cpus:  # an actor without a CPU would never start, and its layers would wait forever
            print(f"[search] the Ray cluster has {cpus} CPUs: {cpus} workers instead of {workers}", file=sys.stderr)
            workers = max(cpus, 1)
        searches = [stack.enter_context(LayerSearch(name, index, job.settings, Path(job.out), job.model_id,
                                                    job.data)) for index, name in layers]
        actors = start_actors(make, workers)
        stack.callback(lambda: [ray.kill(actor) for actor in actors])
        bar = stack.enter_context(tqdm(total=len(layers) * job.settings.iterations, unit="eval",
                                       initial=sum(len(s.history) for s in searches), disable=not progress,
                                       desc=f"search ({len(layers)} layers, {workers} Ray workers)"))
        try:
            drive(searches, actors, batch, bar.update)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; every finished evaluation is logged: rerun the same command to resume") \
                from None
