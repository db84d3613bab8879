"""The one-process mode: learner and actors in this process over ``inproc://`` (``launch.py --one-process``).

The tests reuse it to run a whole job with one stack trace.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def run_one_process(cfg, num_actors: int = 1, timeout_s: float = 600.0) -> list[dict]:
    """Learner and actors in this process over ``inproc://``, stepped in turn; returns each update's metrics.

    The same ``LearnerService`` and ``ActorWorker`` logic as the multi-process run, without process plumbing:
    for tests and for debugging with one stack trace.
    """
    from actors.actor import ActorStopped, ActorWorker
    from actors.tasks import resolve_task
    from common.lora import attach_lora
    from common.models import load_model
    from common.transport import ActorSockets, Endpoints, LearnerSockets, zmq_context
    from learner.process import build_learner
    from learner.service import LearnerService

    endpoints, history = Endpoints.inproc(), []
    deadline = time.monotonic() + timeout_s
    task = resolve_task(cfg)  # TaskSetupError: the caller reports it
    learner = build_learner(cfg)
    with zmq_context() as ctx:
        sockets = [LearnerSockets(ctx, endpoints, cfg.transport.experience_hwm)]
        service = LearnerService(cfg, sockets[0], learner, Path(cfg.run.run_dir))
        service.publish_weights()
        workers = []
        for i in range(num_actors):
            loaded = load_model(cfg.model)
            if not cfg.ppo.full_finetune:
                attach_lora(loaded.model, cfg.lora)
            sockets.append(ActorSockets(ctx, endpoints, cfg.transport.experience_hwm))
            workers.append(ActorWorker(cfg, i, num_actors, sockets[-1], loaded.model, loaded.tokenizer, task))
        try:
            while not all([w.poll_connect(0) for w in workers]):
                service.poll(10)
                if time.monotonic() > deadline:
                    raise TimeoutError("actors did not join the in-process learner")
            while not service.finished and time.monotonic() < deadline:
                for worker in workers:
                    worker.step_nonblocking()
                if (metrics := service.step(timeout_ms=10)) is not None:
                    history.append(metrics)
            service.shutdown("run finished")
            for worker in workers:  # let each actor see the shutdown, as a separate process would
                with contextlib.suppress(ActorStopped):
                    worker.apply_newer_weights()
        finally:
            for sock in sockets:
                sock.close()
    return history
