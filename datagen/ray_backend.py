"""``datagen --ray``: objects as Ray actor tasks, one actor per GPU owning an embedded ComfyUI.

Ray does the scheduling and the retries: actors restart when they die (``max_restarts=-1``) and a task whose
actor died is retried (``max_task_retries``). The images come back to the driver process, which alone writes the
dataset (:class:`datagen.driver.Writer`), so every object is written exactly once whatever Ray retried. Ray is an
optional extra: ``pip install 'comfyui-syncd[ray]'``.
"""

from __future__ import annotations

from typing import Optional

from .driver import DatagenError, Generated, ObjectSpec, Writer, generate, object_seed


class ComfyWorker:
    """A Ray actor: starts an embedded ComfyUI on its GPU (or CPU) and runs one object per call."""

    def __init__(self, comfyui: Optional[str], gpu: bool):
        from ..client.api import ComfyClient
        from ..client.embedded import EmbeddedServer

        self.server = EmbeddedServer(comfyui, cpu=not gpu)
        self.server.start()
        self.client = ComfyClient(self.server.url)

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, workflow: dict, spec: ObjectSpec, seed: int, tiny: bool, timeout: Optional[float]) -> Generated:
        return generate(self.client, workflow, spec, seed, tiny, timeout)

    def stop(self) -> None:
        self.server.stop()


def run_on_ray(address: str, todo: list[ObjectSpec], workflows: dict, writer: Writer, seed: int, tiny: bool,
               retries: int, timeout: Optional[float], workers: Optional[int] = None, comfyui: Optional[str] = None,
               progress=None, on_started=None) -> None:
    """Generate ``todo`` on a Ray cluster; ``on_started(actors)`` is called once the actors are up (tests)."""
    try:
        import ray
    except ImportError:
        raise DatagenError("--ray needs Ray: pip install 'comfyui-syncd[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=None if address in ("auto", "local", "") else address, include_dashboard=False,
                 log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    actor_class = ray.remote(max_restarts=-1, max_task_retries=max(retries, 1), **resources)(ComfyWorker)
    actors = [actor_class.remote(comfyui, bool(gpus)) for _ in range(count)]
    ray.get([actor.pid.remote() for actor in actors])  # wait until every embedded ComfyUI is up
    if on_started is not None:
        on_started(actors)
    futures = {}
    for k, spec in enumerate(todo):
        if writer.has(spec):
            continue
        actor = actors[k % len(actors)]
        future = actor.run.remote(workflows[spec.kind], spec, object_seed(seed, spec.object_id), tiny, timeout)
        futures[future] = spec
    while futures:
        done, _ = ray.wait(list(futures), num_returns=1)
        spec = futures.pop(done[0])
        try:
            writer.write(ray.get(done[0]))
        except Exception as exc:  # noqa: BLE001 - the object failed after Ray's retries
            writer.failed[spec.object_id] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if progress is not None:
            progress(writer)
    ray.get([actor.stop.remote() for actor in actors])
    for actor in actors:
        ray.kill(actor, no_restart=True)
