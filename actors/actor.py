"""The actor: apply the newest policy snapshot, sample a batch of prompts, generate, score, send.

``ActorWorker`` holds the logic and state and is driven one ``step`` at a time (tests and the one-process mode
call it directly); ``run_actor`` is the process loop around it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from actors.reference import reference_logprobs
from actors.rewards import encode_prompts, load_reward
from actors.sampler import SamplingParams, generate_completions
from actors.tasks import PromptSampler, Task
from common import protocol
from common.config import Config, config_hash
from common.cpu_ops import use_fast_cpu_ops
from common.exit_codes import ExitCode
from common.logs import RateLimitFilter
from common.protocol import (
    ExperienceBatch,
    Heartbeat,
    Hello,
    ProtocolError,
    Refuse,
    RolloutGrant,
    RolloutRequest,
    Shutdown,
    Weights,
    WeightsChunk,
    Welcome,
)
from common.transport import ActorSockets, curve_keys
from common.weights import AdapterSync, SnapshotAssembly, read_shared

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # a learner (or an impostor) sending junk must not flood the log


class ActorStopped(Exception):
    """The learner told this actor to stop (``refused``: it would not accept this actor at all)."""

    def __init__(self, reason: str, refused: bool = False):
        super().__init__(reason)
        self.refused = refused


@dataclass
class ActorStats:
    generated_tokens: int = 0
    generate_s: float = 0.0
    reference_s: float = 0.0
    wait_weights_s: float = 0.0
    wait_grant_s: float = 0.0
    blocked_send_s: float = 0.0
    batches_sent: int = 0
    stale_dropped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        return {
            "gen_tokens_per_s": self.generated_tokens / max(self.generate_s, 1e-9),
            "wait_weights_s": self.wait_weights_s,
            "wait_grant_s": self.wait_grant_s,
            "reference_s": self.reference_s,
            "blocked_send_s": self.blocked_send_s,
            "batches_sent": float(self.batches_sent),
            "stale_dropped": float(self.stale_dropped),
        }


def sequence_seed(run_seed: int, actor_id: int, batch_id: int, index: int) -> int:
    """The seed of one sequence: the same run, actor, batch and position always sample the same way."""
    return int(np.random.SeedSequence([run_seed, actor_id, batch_id, index]).generate_state(1)[0])


class ActorWorker:
    def __init__(
        self, cfg: Config, actor_id: int, num_actors: int, sockets: ActorSockets, model, tokenizer, task: Task
    ):
        self.cfg, self.actor_id, self.num_actors, self.sockets = cfg, actor_id, num_actors, sockets
        self.model, self.tokenizer, self.task = model, tokenizer, task
        # resolve_task's batch scorer; a Task built by hand scores with its per-sample reward.
        self.scorer = task.scorer or load_reward("", task, cfg.run.reward_timeout_s)
        self.adapters = AdapterSync(model, full_weights=cfg.ppo.full_finetune)
        self.fetch: SnapshotAssembly | None = None  # an announced snapshot arriving in chunks
        use_fast_cpu_ops(model)  # a no-op off the CPU; the reference pass (no KV cache) takes the fast path
        self.params = SamplingParams.from_config(cfg.sampling)
        self.stop_ids = set(tokenizer.eos_token_ids)
        self.prompts, self.prompt_texts = encode_prompts(
            tokenizer, task.prompts, cfg.sampling.max_prompt_tokens
        )
        self.sampler = PromptSampler(len(self.prompts), actor_id, num_actors, cfg.run.seed)
        self.prompts_per_batch = cfg.sampling.batch_size // cfg.ppo.group_size  # distinct prompts
        self.policy_version = -1
        self.checksum = ""
        self.batch_id = 0
        self.stats = ActorStats()
        self._last_heartbeat = 0.0
        self._next_hello = 0.0
        self.pending: ExperienceBatch | None = None
        self.granted = 0  # batches the learner allowed and this actor has not generated yet
        self.run_id = ""  # the learner's, from its welcome
        self.token = ""  # this admission's, from the welcome: every experience batch carries it
        self.incarnation = (
            uuid.uuid4().hex
        )  # this process's: tells the learner a restart from a repeated hello
        self.grant_version = 0  # generate only with at least the learner's version at the latest grant
        self._next_snapshot_request = 0.0
        self._reported_drops = 0  # stale-dropped sequences already given back to the learner's admission
        self._next_request = 0.0
        self.epoch = 0  # bumped when the learner's run changes or rewinds us: older batches are not sent
        self.learner_seen = time.monotonic()
        self.learner_silent = False
        self._retry_backoff_s = 1.0
        self._next_retry = 0.0

    # -- control -------------------------------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        """Act on one control/broadcast message; raises ActorStopped on shutdown or refusal."""
        try:
            msg = protocol.decode(frames, self.cfg.transport.max_message_mb * 2**20)
        except ProtocolError as e:
            logger.warning("ignored a bad message from the learner: %s", e)
            return
        self._heard_from_learner()
        if isinstance(msg, Refuse) and msg.rejoin:
            logger.info("the learner does not know this actor (it restarted?): saying hello again")
            self.sockets.request(self._hello())
            self.sockets.request(protocol.WeightsRequest(self.actor_id, self.policy_version))
            return
        if isinstance(msg, Shutdown | Refuse):
            raise ActorStopped(msg.reason, refused=isinstance(msg, Refuse))
        if isinstance(msg, Weights) and msg.run_id and msg.run_id != self.run_id:  # untagged: older learner
            logger.debug("ignored a snapshot of learner run %r (welcomed by %r)", msg.run_id, self.run_id)
        elif isinstance(msg, Weights) and msg.policy_version > self.policy_version:
            self._take_snapshot(msg)
        elif isinstance(msg, WeightsChunk) and self.fetch is not None:
            self._take_chunk(msg)
        elif isinstance(msg, RolloutGrant):
            self.granted += 1
            self.grant_version = max(self.grant_version, msg.policy_version)
            self._next_snapshot_request = time.monotonic() + self.cfg.transport.heartbeat_s
            self._next_request = 0.0  # answered: the next request goes out as soon as this grant is used
        elif isinstance(msg, Welcome):
            self._welcomed(msg)

    def _take_snapshot(self, msg: Weights) -> None:
        if msg.shared and (local := read_shared(msg)) is not None:  # on the learner's machine: read its file
            try:
                return self._take_snapshot(local)
            except ValueError as e:  # replaced or damaged meanwhile: fetch the chunks instead
                logger.warning("shared snapshot v%d unusable (%s); fetching it", msg.policy_version, e)
        if msg.chunk_size:  # announced: fetch it in chunks (unless already fetching this one or a newer one)
            if self.fetch is None or self.fetch.announce.policy_version < msg.policy_version:
                self.fetch = SnapshotAssembly(msg)
                self._ask_for_chunks()
            return
        self.adapters.apply(msg)
        self.policy_version, self.checksum = msg.policy_version, msg.checksum
        logger.info("running policy v%d (checksum %s)", msg.policy_version, msg.checksum)

    def _take_chunk(self, chunk: WeightsChunk) -> None:
        try:
            complete = self.fetch.add(chunk)
        except ValueError as e:
            logger.warning("dropped snapshot v%d: %s", chunk.policy_version, e)
            self.fetch = None  # asked for again when the grant needs it
            return
        if not complete:
            return self._ask_for_chunks()
        snapshot, self.fetch = self.fetch.snapshot(), None
        if snapshot.policy_version > self.policy_version:
            self._take_snapshot(snapshot)

    def _ask_for_chunks(self, again: bool = False) -> None:
        for request in self.fetch.requests(self.actor_id, again):
            self.sockets.request(request)

    def _welcomed(self, msg: Welcome) -> None:
        logger.info("welcomed by learner (run %s, policy v%d)", msg.run_id, msg.policy_version)
        if msg.config_hash and msg.config_hash != config_hash(self.cfg):
            raise ActorStopped(
                f"learner run {msg.run_id} has config {msg.config_hash}, this actor {config_hash(self.cfg)}",
                refused=True,
            )
        if self.run_id and msg.run_id != self.run_id:  # a new learner: its snapshot replaces ours
            logger.info("the learner restarted (run %s -> %s): taking its snapshot", self.run_id, msg.run_id)
            self.policy_version, self.epoch, self.fetch = -1, self.epoch + 1, None
        self.run_id, self.token = msg.run_id, msg.token
        if msg.next_batch >= 0:  # resumed from a checkpoint: redo what it had not trained
            self.batch_id, self.epoch = msg.next_batch, self.epoch + 1
            self.sampler.cursor = msg.next_batch * self.prompts_per_batch
            logger.info(
                "continuing at batch %d (prompt %d of this shard)", msg.next_batch, self.sampler.cursor
            )
        self.pending = None  # generated for the learner's earlier run, or before the rewind
        # A (re)started learner knows no earlier request or grant.
        self.granted, self._next_request, self._reported_drops = 0, 0.0, self.stats.stale_dropped
        self.grant_version = 0

    def _heard_from_learner(self) -> None:
        self.learner_seen = time.monotonic()
        if self.learner_silent:
            logger.info("the learner answers again")
        self.learner_silent, self._retry_backoff_s = False, 1.0

    def watch_learner(self) -> bool:
        """Whether the learner is silent past ``transport.learner_timeout_s``; if so, say hello again now and
        then (after 1, 2, 4 ... 30 s) until it answers (the same learner, or a restarted one)."""
        now = time.monotonic()
        if not self.run_id or now - self.learner_seen <= self.cfg.transport.learner_timeout_s:
            return False
        if not self.learner_silent:
            self.learner_silent = True
            logger.warning(
                "the learner went silent: nothing heard for %.0f s; asking again with backoff",
                now - self.learner_seen,
            )
        if now >= self._next_retry:
            self.sockets.request(self._hello())
            self._next_retry = now + self._retry_backoff_s
            self._retry_backoff_s = min(2 * self._retry_backoff_s, 30.0)
        return True

    def _hello(self) -> Hello:
        return Hello(
            self.actor_id,
            config_hash(self.cfg),
            host=socket.gethostname(),
            pid=os.getpid(),
            num_actors=self.num_actors,
            incarnation=self.incarnation,
        )

    def poll_connect(self, timeout_ms: int = 200) -> bool:
        """One round of joining: (re)send hello + snapshot request every 2 s, handle replies. True once joined."""
        if self.policy_version >= 0:
            return True
        if time.monotonic() >= self._next_hello:  # the learner may not be up yet: ask again now and then
            if self.sockets.request(self._hello()):  # not before the hello: the learner would not know us
                self.sockets.request(protocol.WeightsRequest(self.actor_id))
            self._next_hello = time.monotonic() + 2.0
        frames = self.sockets.receive_control(timeout_ms)
        if frames is not None:
            self._handle(frames)
        return self.policy_version >= 0

    def connect(self) -> None:
        """Join the learner: welcome and first snapshot, retrying until transport.startup_timeout_s."""
        deadline = time.monotonic() + self.cfg.transport.startup_timeout_s
        start = time.perf_counter()
        while not self.poll_connect():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the learner never started: no welcome and snapshot from {self.sockets.endpoints.control} "
                    f"within {self.cfg.transport.startup_timeout_s:.0f} s (transport.startup_timeout_s)"
                )
        self.stats.wait_weights_s += time.perf_counter() - start

    def apply_newer_weights(self) -> None:
        for frames in self.sockets.receive_weights():
            self._handle(frames)
        while (frames := self.sockets.receive_control(0)) is not None:
            self._handle(frames)

    # -- the work ------------------------------------------------------------------------------------------

    def generate_batch(self) -> ExperienceBatch:
        group = self.cfg.ppo.group_size
        indices = [i for i in self.sampler.next_indices(self.prompts_per_batch) for _ in range(group)]
        prompts = [self.prompts[i] for i in indices]
        seeds = [
            sequence_seed(self.cfg.run.seed, self.actor_id, self.batch_id, k) for k in range(len(prompts))
        ]
        start = time.perf_counter()
        completions = generate_completions(
            self.model,
            prompts,
            self.params,
            self.stop_ids,
            seeds,
            on_step=self.heartbeat,  # heartbeats keep flowing during a long generation (actor_timeout_s)
            max_rows=self.cfg.sampling.max_rows,
        )
        self.stats.generate_s += time.perf_counter() - start
        n_generated = sum(len(c.response_ids) for c in completions)
        self.stats.generated_tokens += n_generated
        texts = [
            self.tokenizer.decode([t for t in c.response_ids if t not in self.stop_ids]) for c in completions
        ]
        scores = self.scorer([self.prompt_texts[i] for i in indices], texts)  # NaN where the reward failed
        sequences = [
            protocol.Sequence_(len(c.prompt_ids), len(c.response_ids), score, c.finish_reason, i)
            for i, c, score in zip(indices, completions, scores, strict=True)
        ]
        batch = ExperienceBatch(
            self.actor_id,
            self.batch_id,
            self.policy_version,
            tuple(sequences),
            np.concatenate([np.asarray(c.prompt_ids + c.response_ids, np.int32) for c in completions]),
            np.concatenate([c.logprobs for c in completions]).astype(np.float32),
            self._reference(completions),
            gen_tokens_per_s=self.stats.as_dict()["gen_tokens_per_s"],
            token=self.token,
        )
        self.batch_id += 1
        return batch

    def _reference(self, completions) -> np.ndarray | None:
        """Reference log-probs of every response token, when this actor computes them (``ppo.reference_on``)."""
        if self.cfg.ppo.reference_on != "actors":
            return None
        start = time.perf_counter()
        ref = reference_logprobs(
            self.model,
            [c.prompt_ids for c in completions],
            [c.response_ids for c in completions],
            self.params.temperature,
        )
        self.stats.reference_s += time.perf_counter() - start
        return np.concatenate(ref).astype(np.float32)

    def is_stale(self, batch: ExperienceBatch) -> bool:
        """Whether the learner would drop ``batch`` as too old (the actor knows the newest version it applied)."""
        return self.policy_version - batch.policy_version > self.cfg.ppo.max_policy_lag

    def send(self, batch: ExperienceBatch) -> None:
        """Send, waiting out the learner's back-pressure while still answering control messages.

        A batch that became too old while waiting is dropped here (counted) instead of being shipped to be dropped.
        """
        start = time.perf_counter()
        epoch = self.epoch
        while not self.sockets.send_experience(batch, timeout_ms=200):
            self.apply_newer_weights()  # raises ActorStopped on shutdown
            self.watch_learner()
            self.heartbeat()  # not while the learner is silent: hellos go out instead
            if self.epoch != epoch:  # the learner restarted or rewound this actor meanwhile
                logger.info(
                    "dropped batch %d: it was generated for the learner's earlier run", batch.batch_id
                )
                break
            if self.is_stale(batch):
                self.stats.stale_dropped += len(batch.sequences)
                logger.info(
                    "dropped a batch sampled with v%d: the learner is at v%d",
                    batch.policy_version,
                    self.policy_version,
                )
                break
        else:
            self.stats.batches_sent += 1
        self.stats.blocked_send_s += time.perf_counter() - start

    def heartbeat(self, force: bool = False) -> None:
        if self.learner_silent:  # hellos go out instead (``watch_learner``)
            return
        if force or time.monotonic() - self._last_heartbeat >= self.cfg.transport.heartbeat_s:
            self.sockets.request(
                Heartbeat(f"actor-{self.actor_id}", self.policy_version, self.checksum, self.stats.as_dict())
            )
            self._last_heartbeat = time.monotonic()

    def poll_grant(self, timeout_ms: int) -> bool:
        """Ask the learner for a batch (again every heartbeat interval while unanswered); True once granted."""
        if self.watch_learner():  # no requests into the void; hellos with backoff instead
            frames = self.sockets.receive_control(timeout_ms)
            if frames is not None:
                self._handle(frames)
            return False
        if self.granted == 0 and time.monotonic() >= self._next_request:
            returned = self.stats.stale_dropped - self._reported_drops
            if self.sockets.request(RolloutRequest(self.actor_id, self.cfg.sampling.batch_size, returned)):
                self._reported_drops += returned
            self._next_request = time.monotonic() + self.cfg.transport.heartbeat_s
        if self.granted == 0 and (frames := self.sockets.receive_control(timeout_ms)) is not None:
            for broadcast in self.sockets.receive_weights():  # a final snapshot precedes the shutdown
                self._handle(broadcast)
            self._handle(frames)
        self.apply_newer_weights()
        return self.granted > 0 and self._has_granted_weights(timeout_ms)

    def _has_granted_weights(self, timeout_ms: int) -> bool:
        """Whether this actor runs at least the policy version of its grant (sampling older would be staler than
        the learner's bound allows); waits up to ``timeout_ms`` for the snapshot, asking for it if it is late."""
        if self.policy_version >= self.grant_version:
            return True
        arriving = self.sockets.weights if self.fetch is None else self.sockets.control  # chunks: control
        if arriving.poll(timeout_ms):
            self.apply_newer_weights()
        if self.policy_version < self.grant_version and time.monotonic() >= self._next_snapshot_request:
            if self.fetch is not None:
                self._ask_for_chunks(again=True)
            else:
                self.sockets.request(protocol.WeightsRequest(self.actor_id, self.policy_version))
            self._next_snapshot_request = time.monotonic() + self.cfg.transport.heartbeat_s
        return self.policy_version >= self.grant_version

    def wait_for_grant(self) -> None:
        """Block (answering control messages, heartbeating) until the learner grants a batch."""
        start = time.perf_counter()
        while not self.poll_grant(timeout_ms=200):
            self.heartbeat()
        self.stats.wait_grant_s += time.perf_counter() - start

    def step(self) -> None:
        """One batch: a grant, the newest weights, generate + score, send, heartbeat. Raises ActorStopped on stop."""
        self.wait_for_grant()
        self.granted -= 1
        self.send(self.generate_batch())
        self.heartbeat()

    def step_nonblocking(self) -> None:
        """``step`` that never waits: without a grant, or under back-pressure, it returns and is called again."""
        if self.pending is None:
            if not self.poll_grant(timeout_ms=0):
                self.heartbeat()
                return
            self.granted -= 1
            self.pending = self.generate_batch()
        self.apply_newer_weights()
        if self.sockets.send_experience(self.pending, timeout_ms=0):
            self.pending = None
            self.stats.batches_sent += 1
        self.heartbeat()


def prepare_actor(cfg: Config):
    """The task (prompts, scorer) and the policy model of an actor; a setting it cannot work with raises
    ``TaskSetupError`` or ``ValueError`` with the reason (checked before the model loads where possible)."""
    from actors.tasks import resolve_task
    from common.lora import attach_lora
    from common.models import load_model

    task = resolve_task(cfg)  # before the model: a bad prompt file or reward fails in seconds
    loaded = load_model(cfg.model)
    if not cfg.ppo.full_finetune:  # full fine-tuning syncs every weight instead
        attach_lora(loaded.model, cfg.lora)
    context = getattr(loaded.model.args, "max_position_embeddings", None) or 0
    needed = cfg.sampling.max_prompt_tokens + cfg.sampling.max_new_tokens
    if context and needed > context:
        raise ValueError(
            f"sampling.max_prompt_tokens + max_new_tokens = {needed} > the model's context of {context} tokens"
        )
    return task, loaded


def run_actor(cfg: Config, actor_id: int, num_actors: int, endpoints) -> int:
    """The actor process: load the policy, connect, then step until the learner says stop. Returns an exit code."""
    from actors.tasks import TaskSetupError
    from common.transport import zmq_context

    try:
        task, loaded = prepare_actor(cfg)
    except (TaskSetupError, ValueError) as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    with zmq_context() as ctx:
        sockets = ActorSockets(
            ctx,
            endpoints,
            cfg.transport.experience_hwm,
            curve_keys(cfg.transport.keys_dir, "actor"),
            cfg.transport.max_message_mb * 2**20,
        )
        try:
            worker = ActorWorker(cfg, actor_id, num_actors, sockets, loaded.model, loaded.tokenizer, task)
        except ValueError as e:  # no usable prompt
            logger.error("%s", e)
            sockets.close()
            return ExitCode.BAD_SETUP
        try:
            worker.connect()
            while True:
                worker.step()
        except ActorStopped as stop:
            if stop.refused:
                logger.error("the learner refused this actor: %s", stop)
                return ExitCode.REFUSED
            logger.info("stopping: %s", stop)
            return 0
        finally:
            sockets.close()
            if hasattr(worker.scorer, "close"):  # a reward plugin's process
                worker.scorer.close()
