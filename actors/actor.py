"""The actor: apply the newest policy snapshot, sample a batch of prompts, generate, score, send.

``Actor`` is driven one ``step`` at a time, by its process loop (``run_actor``), by the one-process mode and by
the tests alike. It reads the sockets and hands each part what arrived; the parts only send:
``LearnerLink`` (hello, welcome, heartbeats) and ``Grants`` (``actors/link.py``), ``WeightsClient``
(``actors/weights_client.py``), ``Rollout`` (``actors/rollout.py``) and the ``Outbox`` below.
"""

from __future__ import annotations

import logging
import time

from actors.link import ActorStopped, Grants, LearnerLink
from actors.rollout import Rollout, RolloutStats, is_stale
from actors.tasks import Task, TaskSetupError, resolve_task
from actors.weights_client import WeightsClient
from common.config import Config, max_response_tokens
from common.device_share import apply_device_share
from common.exit_codes import ExitCode
from common.logs import RateLimitFilter
from common.models import LoadedModel, load_policy
from common.protocol import ExperienceBatch, Refuse, RolloutGrant, Shutdown, Weights, WeightsChunk, Welcome
from common.transport import ActorSockets, Endpoints, curve_keys, zmq_context

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # what the learner (or an impostor) sends must not flood the log

__all__ = ["Actor", "ActorStopped", "Outbox", "prepare_actor", "run_actor"]


class Outbox:
    """The batch generated and not delivered yet: sent once the learner's back-pressure lets it through, dropped
    (counted) when it became too old meanwhile, or when the learner's run changed under it."""

    def __init__(self, sockets: ActorSockets, stats: RolloutStats, max_policy_lag: int):
        self.sockets, self.stats, self.max_policy_lag = sockets, stats, max_policy_lag
        self.held: ExperienceBatch | None = None

    def hold(self, batch: ExperienceBatch) -> None:
        self.held = batch

    def send(self, timeout_ms: int) -> bool:
        """Send the held batch, waiting up to ``timeout_ms``; whether it went."""
        if not self.sockets.send_experience(self.held, timeout_ms=timeout_ms):
            return False
        self.held = None
        self.stats.batches_sent += 1
        return True

    def drop_if_stale(self, policy_version: int) -> None:
        """Drop the held batch when the learner would drop it as too old (rather than ship it to be dropped)."""
        if self.held is None or not is_stale(self.held.policy_version, policy_version, self.max_policy_lag):
            return
        self.stats.stale_dropped += len(self.held.sequences)
        logger.info(
            "dropped a batch sampled with v%d: the learner is at v%d",
            self.held.policy_version,
            policy_version,
        )
        self.held = None

    def drop(self, why: str) -> None:
        if self.held is not None:
            logger.info("dropped batch %d: %s", self.held.batch_id, why)
        self.held = None


class Actor:
    """One actor: joins the learner, then each ``step`` waits a little for a grant, generates a batch with it, or
    delivers the batch it holds."""

    def __init__(
        self, cfg: Config, actor_id: int, num_actors: int, sockets: ActorSockets, model, tokenizer, task: Task
    ):
        self.cfg, self.sockets = cfg, sockets
        self.stats = RolloutStats()
        self.link = LearnerLink(cfg, actor_id, num_actors, sockets)
        self.grants = Grants(sockets, actor_id, cfg.sampling.batch_size, cfg.transport.heartbeat_s)
        self.weights = WeightsClient(
            model, sockets, actor_id, cfg.ppo.full_finetune, cfg.transport.heartbeat_s
        )
        self.rollout = Rollout(cfg, actor_id, num_actors, model, tokenizer, task, self.stats)
        self.outbox = Outbox(sockets, self.stats, cfg.ppo.max_policy_lag)
        self.joined = False  # welcomed and given a first snapshot (once: a restarted learner is rejoined)

    # -- the loop ------------------------------------------------------------------------------------------

    def step(self, timeout_ms: int = 200) -> None:
        """One round of work, waiting about ``timeout_ms`` at most on the learner: join; or wait for a grant and
        generate a batch with it; or deliver the held batch. Raises ActorStopped when told to stop."""
        if not self.join(timeout_ms):
            return
        if self.outbox.held is None:
            start = time.perf_counter()
            granted = self.poll_grant(timeout_ms)
            self.stats.wait_grant_s += time.perf_counter() - start
            if not granted:
                self.heartbeat()
                return
            self.grants.use()
            self.outbox.hold(self.generate_batch())
        self._deliver(timeout_ms)
        self.heartbeat()

    def join(self, timeout_ms: int = 200) -> bool:
        """One round of joining: (re)send hello + snapshot request every 2 s, handle replies. True once joined."""
        if self.joined:
            return True
        if self.link.greet():  # the learner may not be up yet: ask again now and then
            self.weights.request()  # not before the hello: the learner would not know us
        if (frames := self.sockets.receive_control(timeout_ms)) is not None:
            self._handle(frames)
        self.joined = self.weights.policy_version >= 0
        return self.joined

    def connect(self) -> None:
        """Join the learner: welcome and first snapshot, retrying until transport.startup_timeout_s."""
        deadline = time.monotonic() + self.cfg.transport.startup_timeout_s
        start = time.perf_counter()
        while not self.join():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the learner never started: no welcome and snapshot from {self.sockets.endpoints.control} "
                    f"within {self.cfg.transport.startup_timeout_s:.0f} s (transport.startup_timeout_s)"
                )
        self.stats.wait_weights_s += time.perf_counter() - start

    def poll_grant(self, timeout_ms: int) -> bool:
        """Ask the learner for a batch (again every heartbeat interval while unanswered); True once granted and
        running at least the grant's policy version."""
        # What arrived while this actor generated (a long batch, an episode batch of a minute on a CPU) first:
        # the learner was heard then, not silent.
        self.take_messages()
        if self.link.watch():  # no requests into the void; hellos with backoff instead
            if (frames := self.sockets.receive_control(timeout_ms)) is not None:
                self._handle(frames)
            return False
        self.grants.ask(self.stats.stale_dropped)
        if not self.grants.granted and (frames := self.sockets.receive_control(timeout_ms)) is not None:
            for broadcast in self.sockets.receive_weights():  # a final snapshot precedes the shutdown
                self._handle(broadcast)
            self._handle(frames)
        self.take_messages()
        return self.grants.granted > 0 and self._has_granted_weights(timeout_ms)

    def generate_batch(self) -> ExperienceBatch:
        return self.rollout.run(self.weights.policy_version, self.link.token, on_step=self.heartbeat)

    def take_messages(self) -> None:
        """Act on every message waiting: broadcast snapshots first, then control. Raises ActorStopped on stop."""
        for frames in self.sockets.receive_weights():
            self._handle(frames)
        while (frames := self.sockets.receive_control(0)) is not None:
            self._handle(frames)

    def heartbeat(self, force: bool = False) -> None:
        self.link.heartbeat(self.weights.policy_version, self.weights.checksum, self.stats, force)

    def close(self) -> None:
        if hasattr(self.rollout.scorer, "close"):  # a reward plugin's process
            self.rollout.scorer.close()

    # -- parts of a step -----------------------------------------------------------------------------------

    def _deliver(self, timeout_ms: int) -> None:
        """Send the held batch, waiting out the learner's back-pressure up to ``timeout_ms``; while it is blocked,
        answer control messages and drop the batch if it went stale meanwhile (counted)."""
        start = time.perf_counter()
        if not self.outbox.send(timeout_ms):
            self.take_messages()  # raises ActorStopped on shutdown; a newer snapshot may make the batch stale
            self.link.watch()
            self.outbox.drop_if_stale(self.weights.policy_version)
        self.stats.blocked_send_s += time.perf_counter() - start

    def _has_granted_weights(self, timeout_ms: int) -> bool:
        """Whether this actor runs at least the policy version of its grant (sampling older would be staler than
        the learner's bound allows); waits up to ``timeout_ms`` for the snapshot, asking for it if it is late."""
        if self.weights.policy_version >= self.grants.version:
            return True
        if self.weights.arriving().poll(timeout_ms):
            self.take_messages()
        self.weights.ask_if_late(self.grants.version)
        return self.weights.policy_version >= self.grants.version

    def _handle(self, frames: list[bytes]) -> None:
        """Act on one control/broadcast message; raises ActorStopped on shutdown or refusal."""
        msg = self.link.decode(frames)
        if isinstance(msg, Refuse) and msg.rejoin:
            logger.info("the learner does not know this actor (it restarted?): saying hello again")
            self.link.say_hello()
            self.weights.request()
        elif isinstance(msg, Shutdown | Refuse):
            raise ActorStopped(msg.reason, refused=isinstance(msg, Refuse))
        elif isinstance(msg, Weights) and msg.run_id and msg.run_id != self.link.run_id:  # untagged: older
            logger.debug(
                "ignored a snapshot of learner run %r (welcomed by %r)", msg.run_id, self.link.run_id
            )
        elif isinstance(msg, Weights | WeightsChunk):
            self.weights.take(msg)
        elif isinstance(msg, RolloutGrant):
            self.grants.take(msg)
            self.weights.ask_later()
        elif isinstance(msg, Welcome):
            self._welcomed(msg)

    def _welcomed(self, msg: Welcome) -> None:
        if self.link.welcomed(msg):  # a new learner run: its snapshot replaces ours
            self.weights.forget()
            self.outbox.drop("it was generated for the learner's earlier run")
        if msg.next_batch >= 0:  # resumed from a checkpoint: redo what it had not trained
            self.rollout.resume_at(msg.next_batch)
            self.outbox.drop("the learner rewound this actor")
        self.grants.reset(self.stats.stale_dropped)  # a (re)started learner knows no earlier request or grant


def prepare_actor(cfg: Config) -> tuple[Task, LoadedModel]:
    """The task (prompts, scorer) and the policy model of an actor; a setting it cannot work with raises
    ``TaskSetupError`` or ``ValueError`` with the reason (checked before the model loads where possible)."""
    task = resolve_task(cfg)  # before the model: a bad prompt file or reward fails in seconds
    loaded = load_policy(cfg.model, cfg.lora, cfg.ppo.full_finetune)
    context = getattr(loaded.model.args, "max_position_embeddings", None) or 0
    needed = cfg.sampling.max_prompt_tokens + max_response_tokens(cfg)
    budget = "max_episode_tokens - 1" if cfg.run.environment else "max_new_tokens"
    if context and needed > context:
        raise ValueError(
            f"sampling.max_prompt_tokens + {budget} = {needed} > the model's context of {context} tokens"
        )
    return task, loaded


def run_actor(cfg: Config, actor_id: int, num_actors: int, endpoints: Endpoints) -> int:
    """The actor process: load the policy, connect, then step until the learner says stop. Returns an exit code."""
    apply_device_share("actor")  # its part of a GPU shared with the learner and other actors
    try:
        task, loaded = prepare_actor(cfg)
    except (TaskSetupError, ValueError) as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    with zmq_context() as ctx:
        sockets = _open_sockets(ctx, cfg, endpoints)
        try:
            actor = Actor(cfg, actor_id, num_actors, sockets, loaded.model, loaded.tokenizer, task)
        except ValueError as e:  # no usable prompt
            logger.error("%s", e)
            sockets.close()
            return ExitCode.BAD_SETUP
        try:
            return _serve(actor)
        finally:
            sockets.close()
            actor.close()


def _open_sockets(ctx, cfg: Config, endpoints: Endpoints) -> ActorSockets:
    keys = curve_keys(cfg.transport.keys_dir, "actor")
    max_bytes = cfg.transport.max_message_mb * 2**20
    return ActorSockets(ctx, endpoints, cfg.transport.experience_hwm, keys, max_bytes)


def _serve(actor: Actor) -> int:
    """Connect, then step until the learner says stop; the process's exit code."""
    try:
        actor.connect()
        while True:
            actor.step()
    except ActorStopped as stop:
        if stop.refused:
            logger.error("the learner refused this actor: %s", stop)
            return ExitCode.REFUSED
        logger.info("stopping: %s", stop)
        return 0
