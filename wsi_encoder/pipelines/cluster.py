"""Where dask runs a job: the local threaded scheduler, a local process cluster, or a running cluster.

Every job (``wsienc tile``, ``wsienc encode``) is a set of independent dask tasks whose results are
small records; :class:`TaskRunner.map_unordered` runs them and yields each result as soon as it
is ready, so the caller can report progress, finish a slide the moment its last task is done, and
survive a failed task. Three runners, chosen by :func:`get_runner`:

* ``scheduler=None`` or ``"threads"``: dask's local threaded scheduler with ``workers`` threads
  (no extra processes; the default on one machine);
* ``"processes"``: a ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes;
* ``"tcp://HOST:PORT"`` (or ``"HOST:PORT"``): a running dask.distributed scheduler (started with
  ``dask scheduler`` and ``dask worker``, or by dask-jobqueue on SLURM/PBS); the cluster decides how
  many workers there are. A ``distributed.Client`` can also be passed in directly.

Tasks must be module-level functions of an installed package (workers import them) and receive
only small arguments (paths, parameters): workers open the slides and stores themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from wsi_encoder.errors import InvalidParameterError
from wsi_encoder.io.urls import RETRIES_ENV, STORAGE_OPTIONS_ENV

logger = logging.getLogger(__name__)

_WORKER_WAIT_S = 120.0


@dataclass(frozen=True)
class TaskFailure:
    """Returned in place of a result when a task raised or its worker died."""

    error: str


class TaskRunner(ABC):
    """Runs independent tasks and yields ``(index, result)`` as they finish."""

    #: Number of tasks that can run at once.
    workers: int = 1

    @abstractmethod
    def map_unordered(
        self, fn: Callable[..., Any], items: Sequence[Any], *, name: str = "task"
    ) -> Iterator[tuple[int, Any]]:
        """Run ``fn(item)`` for every item; yield ``(index, result)`` in completion order.

        A task that raises (or whose worker dies) yields a :class:`TaskFailure` as its result.
        """

    def describe(self) -> str:
        """One line saying where the work runs."""
        return type(self).__name__

    def close(self) -> None:  # noqa: B027 - most runners have nothing to release
        """Release the scheduler/cluster if this runner started it."""

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unless_stopped(stop: threading.Event, fn: Callable[..., Any], item: Any) -> Any:
    if stop.is_set():
        return TaskFailure("cancelled")
    return _guarded(fn, item)


#: Settings a task carries to workers started elsewhere: --storage-options and --retries.
_TASK_ENV = (STORAGE_OPTIONS_ENV, RETRIES_ENV)


def _guarded(fn: Callable[..., Any], item: Any, env: dict[str, str] | None = None) -> Any:
    for name, value in (env or {}).items():  # the driver's settings, on a worker started elsewhere
        os.environ[name] = value
    try:
        return fn(item)
    except Exception as exc:  # reported per task; the job goes on
        logger.debug("task failed", exc_info=True)
        return TaskFailure(f"{type(exc).__name__}: {exc}")


class LocalRunner(TaskRunner):
    """dask's local threaded scheduler with ``workers`` threads (``"synchronous"``: one, in order)."""

    def __init__(self, workers: int | None = None, scheduler: str = "threads") -> None:
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.scheduler = scheduler

    def describe(self) -> str:
        return f"dask local {self.scheduler} scheduler, {self.workers} worker thread(s)"

    def map_unordered(
        self, fn: Callable[..., Any], items: Sequence[Any], *, name: str = "task"
    ) -> Iterator[tuple[int, Any]]:
        import dask

        if not items:
            return
        prefix = f"{name}-{uuid.uuid4().hex[:8]}-"
        stop = threading.Event()  # set when the caller stops early: tasks not started yet do nothing
        # Each task is a closure over its item: dask would otherwise walk every item's fields (dataclasses,
        # numpy arrays of coordinates) looking for collections, a serial cost before the first task starts.
        tasks = [
            dask.delayed(functools.partial(_unless_stopped, stop, fn, item), pure=False)(dask_key_name=f"{prefix}{i}")
            for i, item in enumerate(items)
        ]
        done: queue.Queue[tuple[str, Any]] = queue.Queue()
        finished = object()

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(key, str) and key.startswith(prefix):
                done.put((key, result))

        # The scheduler function itself, not its name: dask resolves names by importing dask.distributed
        # (a third of a second of start-up) to look for a client.
        if self.scheduler == "synchronous":
            from dask.local import get_sync as scheduler_get
        else:
            from dask.threaded import get as scheduler_get

        def run() -> None:
            try:
                dask.compute(
                    *tasks,
                    scheduler=scheduler_get,
                    num_workers=self.workers,
                    callbacks=[(None, None, None, posttask, None)],  # (start, start_state, pretask, posttask, finish)
                    optimize_graph=False,
                )
            except BaseException as exc:  # only scheduler failures: tasks are guarded
                done.put(("", exc))
            done.put(("", finished))

        thread = threading.Thread(target=run, name=f"wsienc-{name}", daemon=True)
        thread.start()
        try:
            while True:
                key, result = done.get()
                if result is finished:
                    break
                if key == "":
                    raise result
                yield int(key[len(prefix) :]), result
        finally:
            # Also on an early exit (an error or Ctrl-C in the caller): let running tasks finish and
            # skip the rest, so nothing writes after the caller released its store lock.
            stop.set()
            thread.join()


class DistributedRunner(TaskRunner):
    """A dask.distributed client; tasks are submitted in a rolling window so the scheduler stays small."""

    def __init__(self, client: Any, *, owns_client: bool = False, cluster: Any = None) -> None:
        self.client = client
        self._owns_client = owns_client
        self._cluster = cluster
        info = client.scheduler_info()
        threads = sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values())
        self.workers = max(1, threads)

    def describe(self) -> str:
        info = self.client.scheduler_info()
        n = len(info.get("workers", {}))
        return f"dask.distributed scheduler {self.client.scheduler.address}, {n} worker(s), {self.workers} thread(s)"

    def map_unordered(
        self, fn: Callable[..., Any], items: Sequence[Any], *, name: str = "task"
    ) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        if not items:
            return
        prefix = f"{name}-{uuid.uuid4().hex[:8]}-"
        # Workers of an external scheduler were started without this process's environment: every task
        # carries the --storage-options and --retries it was given (WSIENC_STORAGE_OPTIONS, WSIENC_RETRIES),
        # so remote paths open alike and retry alike.
        env = {name: os.environ[name] for name in _TASK_ENV if name in os.environ}
        window = max(16, 4 * self.workers)
        pending = iter(enumerate(items))
        index_of: dict[str, int] = {}

        def submit_next() -> Any:
            try:
                i, item = next(pending)
            except StopIteration:
                return None
            future = self.client.submit(
                _guarded, fn, item, env, key=f"{prefix}{i}", pure=False, retries=0
            )
            index_of[future.key] = i
            return future

        first = [f for f in (submit_next() for _ in range(window)) if f is not None]
        completed = as_completed(first)
        try:
            for future in completed:
                i = index_of.pop(future.key)
                if future.status == "finished":
                    result = future.result()
                else:
                    exc = future.exception()
                    result = TaskFailure(f"{type(exc).__name__}: {exc} (the dask worker failed)")
                future.release()
                nxt = submit_next()
                if nxt is not None:
                    completed.add(nxt)
                yield i, result
        finally:
            if index_of:  # the caller stopped early: drop what has not run
                self.client.cancel(list(completed.futures))

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def get_runner(workers: int | None = None, scheduler: str | None = None, client: Any = None) -> TaskRunner:
    """The runner for ``--workers N`` / ``--scheduler ...`` (see the module docstring).

    Raises
    ------
    InvalidParameterError
        Unknown scheduler value, bad worker count, or an unreachable scheduler address.
    """
    if workers is not None and workers < 1:
        raise InvalidParameterError(f"--workers {workers!r} must be at least 1")
    if client is not None:
        return DistributedRunner(client)
    if scheduler in (None, "", "threads", "synchronous"):
        return LocalRunner(workers, scheduler or "threads")
    if scheduler == "processes":
        from distributed import Client, LocalCluster

        n = max(1, int(workers or os.cpu_count() or 1))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0")
        return DistributedRunner(Client(cluster), owns_client=True, cluster=cluster)
    address = scheduler if "://" in scheduler else f"tcp://{scheduler}"
    host_port = address.split("://", 1)[1]
    if not address.startswith(("tcp://", "tls://", "ucx://", "ws://", "wss://")) or not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):\d+/?", host_port):
        raise InvalidParameterError(
            f"--scheduler {scheduler!r}: use threads, processes, or a dask scheduler address like tcp://HOST:8786"
        )
    from distributed import Client

    if workers is not None:
        logger.warning("--workers is ignored with --scheduler %s: the cluster's workers do the work", address)
    try:
        dask_client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InvalidParameterError(
            f"cannot reach the dask scheduler at {address} ({exc}); start one with `dask scheduler` "
            "and at least one `dask worker ADDRESS`, or drop --scheduler to run locally"
        ) from exc
    try:
        dask_client.wait_for_workers(1, timeout=_WORKER_WAIT_S)
    except TimeoutError as exc:
        dask_client.close()
        raise InvalidParameterError(
            f"the dask scheduler at {address} has no workers after {_WORKER_WAIT_S:.0f} s; "
            f"start some with `dask worker {address}`"
        ) from exc
    return DistributedRunner(dask_client, owns_client=True)
