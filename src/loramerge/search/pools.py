"""Where candidates are scored: in this process (one worker), in local worker processes, or on Ray
actors (a cluster, or a Ray instance started on this machine). Every pool returns scores in task
order, whatever order they finish in, so the search sees the same sequence with any parallelism."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from loramerge.errors import BadInput
from loramerge.search.evaluator import Evaluator, Scores, Task
from loramerge.search.job import SearchJob

Pool = Callable[[Iterable[Task]], Iterator[Scores]]
LOCAL_RAY = "local"  # --ray-address local: start a Ray instance on this machine (as the tests do)


class Worker:
    """An evaluator whose start-up failure (a base that does not load on that machine, say) is raised by
    its first task, so the driver gets the error itself, not a broken pool or a dead actor."""

    def __init__(self, job: SearchJob) -> None:
        self.evaluator, self.error = None, None
        try:
            self.evaluator = Evaluator(job)
        except Exception as error:  # re-raised by score(), in the driver's task order
            self.error = error

    def score(self, task: Task) -> Scores:
        if self.evaluator is None:
            raise self.error or RuntimeError("the search worker did not start")
        return self.evaluator.score(task)


_worker: Worker | None = None


def _start_worker(pickled_job: bytes) -> None:
    """A worker process's initializer. The job comes pickled so that the warning and logging settings
    are made before unpickling imports the libraries."""
    global _worker
    import logging
    import pickle
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the pool

    # a worker's library warnings (deprecations, bitsandbytes' optional speed-ups) would interleave with the
    # driver's progress bar; the merge's own warnings are the plan's, which the driver reports
    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    _worker = Worker(pickle.loads(pickled_job))


def _score(task: Task) -> Scores:
    assert _worker is not None, "_start_worker runs first in every worker process"
    return _worker.score(task)


@contextmanager
def in_process(job: SearchJob) -> Iterator[Pool]:
    """The evaluator in this process, on ``job.threads`` threads while the search runs (the caller's
    thread count is put back after it)."""
    import torch

    threads = torch.get_num_threads()
    try:
        evaluator = Evaluator(job)
        yield lambda tasks: (evaluator.score(task) for task in tasks)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def local_processes(job: SearchJob, workers: int) -> Iterator[Pool]:
    """``workers`` spawned processes (a fresh interpreter each: no forked torch thread pools), each
    loading the base once."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    start = {"initializer": _start_worker, "initargs": (pickle.dumps(job),)}
    executor = ProcessPoolExecutor(workers, mp_context=context, **start)
    try:
        yield lambda tasks: executor.map(_score, tasks)
    finally:  # on an error or Ctrl-C, the tasks not yet started are dropped, not run to the end
        executor.shutdown(wait=True, cancel_futures=True)


def ray_module():
    try:
        import ray
    except ImportError:
        raise BadInput("`ray_address` needs Ray: pip install 'loramerge[ray]'", param="ray_address") from None
    return ray


@contextmanager
def ray_actors(job: SearchJob, workers: int, address: str) -> Iterator[Pool]:
    """``workers`` Ray actors of ``job.threads`` CPUs (or one GPU each with ``device='cuda'``) on the
    cluster at ``address`` (``local``: a Ray instance started here). The job goes to the object store
    once; each actor loads the base model itself."""
    ray = ray_module()
    from ray.util import ActorPool

    quiet = {"log_to_driver": False, "logging_level": "ERROR"}  # workers' output would break the progress bar
    connected = not ray.is_initialized()  # a caller's own Ray session is used as it is, and left open
    try:
        if connected and address == LOCAL_RAY:
            ray.init(num_cpus=workers * job.threads, include_dashboard=False, **quiet)
        elif connected:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise BadInput(
            f"`ray_address='{address}'`: cannot connect to Ray ({str(error).splitlines()[0]})", param="ray_address"
        ) from None
    actors = []
    try:
        resources = {"num_gpus": 1} if job.device.startswith("cuda") else {"num_cpus": job.threads}
        check_capacity(ray.cluster_resources(), resources, workers, address)
        remote = ray.remote(**resources)(Worker)
        shipped = ray.put(job)
        actors = [remote.remote(shipped) for _ in range(workers)]
        pool = ActorPool(actors)

        def scores(tasks: Iterable[Task]) -> Iterator[Scores]:
            try:
                yield from pool.map(lambda actor, task: actor.score.remote(task), tasks)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, BadInput):  # one line, not the remote traceback
                    raise BadInput(str(error.cause)) from None
                raise

        yield scores
    finally:
        for actor in actors:
            ray.kill(actor)
        if connected:
            ray.shutdown()


def check_capacity(offered: dict, each: dict, workers: int, address: str) -> None:
    """Actors the cluster cannot place would wait forever: refuse a request larger than the cluster."""
    for name, amount in each.items():
        kind = {"num_cpus": "CPU", "num_gpus": "GPU"}[name]
        if offered.get(kind, 0) < workers * amount:
            raise BadInput(f"`ray_address='{address}'`: the cluster offers {offered.get(kind, 0):g} {kind}s, and "
                           f"`workers={workers}` need {workers * amount:g}; lower `workers` or `threads`",
                           param="workers")  # fmt: skip


def evaluator_pool(job: SearchJob, workers: int = 1, ray_address: str | None = None):
    """The pool the options ask for: Ray with an address, else local processes, else this process."""
    if workers < 1:
        raise BadInput(f"`workers` must be at least 1, got {workers}", param="workers")
    if ray_address:
        return ray_actors(job, workers, ray_address)
    return local_processes(job, workers) if workers > 1 else in_process(job)
