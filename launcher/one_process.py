"""The one-process mode: learner and actors in this process over ``inproc://`` (``launch.py --one-process``).

The tests reuse it to run a whole job with one stack trace. It steps the same ``LearnerService`` and the same
``Actor.step`` as a run of separate processes (stale batches are dropped alike), without the process plumbing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def _start_actors(cfg, ctx, endpoints, num_actors: int, sockets: list) -> list:
    """``num_actors`` actors on their own sockets (appended to ``sockets``, which the caller closes)."""
    from actors.actor import Actor
    from actors.tasks import resolve_task
    from common.models import load_policy
    from common.transport import ActorSockets

    task = resolve_task(cfg)  # TaskSetupError: the caller reports it
    actors = []
    for i in range(num_actors):
        loaded = load_policy(cfg.model, cfg.lora, cfg.ppo.full_finetune)
        sockets.append(ActorSockets(ctx, endpoints, cfg.transport.experience_hwm))
        actors.append(Actor(cfg, i, num_actors, sockets[-1], loaded.model, loaded.tokenizer, task))
    return actors


def run_one_process(cfg, num_actors: int = 1, timeout_s: float = 600.0) -> list[dict]:
    """Learner and actors in this process over ``inproc://``, stepped in turn; returns each update's metrics."""
    from actors.actor import ActorStopped
    from common.transport import Endpoints, LearnerSockets, zmq_context
    from learner.process import build_learner
    from learner.service import LearnerService

    endpoints, history, deadline = Endpoints.inproc(), [], time.monotonic() + timeout_s
    learner = build_learner(cfg)
    with zmq_context() as ctx:
        sockets = [LearnerSockets(ctx, endpoints, cfg.transport.experience_hwm)]
        service = LearnerService(cfg, sockets[0], learner, Path(cfg.run.run_dir))
        service.publish_weights()
        try:
            actors = _start_actors(cfg, ctx, endpoints, num_actors, sockets)
            while not all([a.join(0) for a in actors]):  # all of them before any work, then one step each
                service.poll(10)
                if time.monotonic() > deadline:
                    raise TimeoutError("actors did not join the in-process learner")
            while not service.finished and time.monotonic() < deadline:
                for actor in actors:
                    actor.step(timeout_ms=0)
                if (metrics := service.step(timeout_ms=10)) is not None:
                    history.append(metrics)
            service.shutdown("run finished")
            for actor in actors:  # let each actor see the shutdown, as a separate process would
                with contextlib.suppress(ActorStopped):
                    actor.take_messages()
        finally:
            for sock in sockets:
                sock.close()
    return history
