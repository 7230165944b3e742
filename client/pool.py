"""Run jobs on several ComfyUI servers (the ``datagen`` and ``eval`` commands' ``--server URL``, repeatable).

One worker thread per server takes jobs from one queue. A job that fails on a server is retried on a server that
has not failed it yet (up to ``retries`` more attempts); a :class:`JobError` (or another ``final`` type) fails the
same way anywhere and is not retried; a server that stops answering ``/system_stats`` is dropped and the job it held
goes back to the queue (not the job's fault). Jobs left when no server is alive fail with a message saying so.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Hashable, Optional, Sequence

NO_SERVER_LEFT = "no ComfyUI server left to run it"


class JobError(ValueError):
    """A job that fails the same way on any server (a refused workflow, a missing output): not retried."""


def unreachable(client) -> bool:
    """Whether ``client``'s server no longer answers (``/system_stats``): tells a dead server from a failed job."""
    try:
        client.system_stats()
        return False
    except Exception:  # noqa: BLE001 - any failure to answer means the server is gone
        return True


def run_jobs(urls: Sequence[str], jobs: Sequence, work: Callable, key: Callable[[object], Hashable],
             retries: int = 2, progress: Optional[Callable[[object, Optional[str]], None]] = None,
             final: tuple = ()) -> dict:
    """``work(client, job)`` (a :class:`client.api.ComfyClient`) for every job on the servers ``urls``; returns
    {key(job): "ExceptionType: message"} of the jobs that failed. ``progress(job, error or None)`` is called once
    per finished job, from the worker thread. ``final``: exception types not retried besides :class:`JobError`."""
    from .api import ComfyClient

    final = (JobError, *final)
    pending: "queue.Queue[tuple[object, int, frozenset]]" = queue.Queue()
    for job in jobs:
        pending.put((job, 0, frozenset()))
    failed: dict = {}
    remaining = [len(jobs)]
    alive = set(urls)
    state = threading.Condition()

    def finish(job, error: Optional[str] = None) -> None:
        with state:
            if error is not None:
                failed[key(job)] = error
            remaining[0] -= 1
            state.notify_all()
        if progress is not None:
            progress(job, error)

    def worker(url: str) -> None:
        client = ComfyClient(url)
        while True:
            with state:
                if remaining[0] == 0 or url not in alive:
                    return
            try:
                job, attempts, tried = pending.get(timeout=0.2)
            except queue.Empty:
                continue
            if url in tried and len(alive - tried) > 0:
                pending.put((job, attempts, tried))  # leave it to a server that has not failed it yet
                time.sleep(0.05)
                continue
            try:
                work(client, job)
            except Exception as exc:  # noqa: BLE001 - connection, websocket, API and workflow errors alike
                is_final = isinstance(exc, final)
                if not is_final and unreachable(client):
                    with state:
                        alive.discard(url)
                        state.notify_all()
                    pending.put((job, attempts, tried))  # not the job's fault
                    return
                if is_final or attempts + 1 > retries:
                    finish(job, f"{type(exc).__name__}: {exc}")
                else:
                    pending.put((job, attempts + 1, tried | {url}))
                continue
            finish(job)

    threads = [threading.Thread(target=worker, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    with state:
        while remaining[0] > 0 and alive:
            state.wait(timeout=1.0)
    for thread in threads:
        thread.join(timeout=5.0)
    while not pending.empty():
        job, _, _ = pending.get()
        failed.setdefault(key(job), NO_SERVER_LEFT)
    return failed
