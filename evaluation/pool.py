"""Run jobs on several ComfyUI servers: one worker thread per server, a failed job retried on another server, a
server that stops answering dropped and its job requeued (the scheme of ``datagen.driver.run_on_servers``,
for any job)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Hashable, Optional, Sequence

from ..datagen.driver import _unreachable


class JobError(ValueError):
    """A job that fails the same way on any server (a refused workflow, a missing output): not retried."""


def run_jobs(urls: Sequence[str], jobs: Sequence, work: Callable, key: Callable[[object], Hashable],
             retries: int = 2, progress: Optional[Callable[[object, Optional[str]], None]] = None) -> dict:
    """``work(client, job)`` for every job on the servers ``urls``; returns {key(job): error} of the jobs that
    failed. ``progress(job, error or None)`` is called once per finished job."""
    from ..client.api import ComfyClient, PromptValidationError

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
                final = isinstance(exc, (JobError, PromptValidationError))
                if not final and _unreachable(client):
                    with state:
                        alive.discard(url)
                        state.notify_all()
                    pending.put((job, attempts, tried))  # not the job's fault
                    return
                if final or attempts + 1 > retries:
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
        failed.setdefault(key(job), "no ComfyUI server left to run it")
    return failed
