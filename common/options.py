"""Every option of a run, declared once: the config tree's frozen dataclasses, one per TOML section.

Each attribute's docstring says what it means; its default is the one default. ``Literal`` types list a mode's
allowed values (``common.config_checks`` refuses others from the type). ``common.config`` builds a tree from
defaults < TOML file < ``--set`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the policy's base model and how it is computed."""

    name: str = "default"
    """'default' (bundled SmolLM2-135M-Instruct), 'tiny' (random-init test llama), a local mlx-lm folder, or a
    Hugging Face id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'auto' (float32 on CPU, the checkpoint's own dtype on Metal/CUDA), 'float32', 'bfloat16' or 'float16'."""
    cache_dir: str = ""
    """Where converted models are kept; '' means $MLX_PPO_CACHE or ~/.cache/mlx-ppo."""
    adapters: str = ""
    """Start the policy from these saved LoRA adapters (an mlx-lm adapter folder, e.g. an earlier run's
    ``adapters/``); '' starts from fresh adapters. The reference policy stays the base model."""
    lm_head_fp32: bool = False
    """Compute the vocabulary projection in float32 on both sides (sampler and learner) when the model runs in
    bf16/fp16: the log-probs of the ratio then carry no bf16 rounding (a no-op in float32)."""


@dataclass(frozen=True)
class LoraConfig:
    """``[lora]``: the adapters PPO trains (unless ``ppo.full_finetune``)."""

    rank: int = 8
    """LoRA rank r (8 keeps a SmolLM2-135M snapshot under 2% of the full weights)."""
    alpha: float = 16.0
    """LoRA alpha; the adapter output is scaled by alpha / rank (mlx-lm's 'scale')."""
    dropout: float = 0.0
    """Dropout on the adapter input. 0 keeps actor and learner log-probs identical, which PPO wants."""
    num_layers: int = -1
    """Adapt the last N transformer blocks; -1 adapts all of them."""
    keys: tuple[str, ...] = ()
    """Module paths inside a block to adapt (e.g. 'self_attn.q_proj'); empty adapts every linear layer."""


@dataclass(frozen=True)
class SamplingConfig:
    """``[sampling]``: how actors generate responses."""

    temperature: float = 1.0
    """Sampling temperature (> 0 for training; behaviour log-probs are taken under it). Sampling draws from the
    whole tempered distribution: no top-k / top-p, whose truncated support the learner's ratio cannot see."""
    max_new_tokens: int = 64
    """Response length limit; a response stops earlier at the end-of-sequence token."""
    max_prompt_tokens: int = 256
    """Prompts longer than this are rejected (counted), never silently cut."""
    batch_size: int = 16
    """Sequences an actor generates together."""
    max_rows: int = 0
    """At most this many of them decode at once (bounds the KV cache); finished rows are refilled with the
    batch's waiting prompts once half are free. 0: the whole batch at once."""
    max_episode_tokens: int = 1024
    """With ``run.environment``: response tokens of one episode, all its turns (the model's and the
    environment's). A model turn starts only while ``max_new_tokens`` more fit below this, so a response holds
    at most ``max_episode_tokens - 1``, the limit the learner accepts (``max_response_tokens``). Must exceed
    ``max_new_tokens``; ``max_prompt_tokens + max_episode_tokens - 1`` must fit the model's context."""


@dataclass(frozen=True)
class PPOUpdateConfig:
    """``[ppo]``: the algorithm and its update. Flat on purpose (one attribute per ``ppo.key`` setting, read by
    the learner's parts one or two at a time), so it holds many more than a dozen attributes."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    """'ppo' (critic + GAE), 'grpo' (group-normalised scores) or 'rloo' (leave-one-out baseline)."""
    group_size: int = 4
    """Completions sampled per prompt (consecutive in a batch); GRPO and RLOO compare them, so need >= 2."""
    batch_size: int = 32
    """Sequences per update."""
    num_minibatches: int = 2
    """Minibatches per epoch; each is one optimizer step."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass; gradients of a minibatch's micro-batches are accumulated."""
    micro_batch_tokens: int = -1
    """Instead of ``micro_batch_size``: as many length-sorted sequences per pass as fit this many padded tokens
    (short answers in large micro-batches, long ones in small). -1: chosen from the device's memory on a GPU,
    off on the CPU backend (learner/micro_batches.py). 0: off."""
    vocab_chunk: int = 0
    """Response tokens per chunk of the vocabulary pass (log-probs and their gradient without a ``[tokens, V]``
    float32 array; the backward recomputes each chunk's logits: learner/vocab_pass.py). 0: the whole micro-batch
    at once. With ``ent_coef > 0`` the entropy bonus takes the plain pass."""
    compute_threads: int = 0
    """Threads the learner splits each micro-batch over on the CPU backend (each shard on its own MLX stream;
    peak memory stays one micro-batch's). 0: one per core the learner may use (its share of BLAS threads
    when launched; 1 on a GPU). 1: no worker threads."""
    update_epochs: int = 2
    """Passes over the batch per update."""
    learning_rate: float = 5e-5
    """Peak Adam learning rate for the policy adapters and the value model (Adam is bias-corrected)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning rate after the warm-up: 'constant', 'cosine' or 'linear' decay to ``min_lr_ratio`` x the rate
    over the run's optimizer steps (run.max_updates x update_epochs x num_minibatches)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``learning_rate`` (0: none)."""
    min_lr_ratio: float = 0.0
    """Where the cosine or linear decay ends, as a fraction of ``learning_rate``."""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (both sides, unless clip_low / clip_high say otherwise)."""
    clip_low: float = 0.0
    """Lower clip: the ratio is kept above 1 - clip_low (0: clip_coef)."""
    clip_high: float = 0.0
    """Upper clip: the ratio is kept below 1 + clip_high (0: clip_coef). DAPO's clip-higher: 0.28 with
    clip_low 0.2 leaves room for unlikely tokens to grow and keeps entropy from collapsing."""
    dual_clip: float = 0.0
    """Dual clip (Ye et al. 2020): with a negative advantage the loss of a token is at most dual_clip x |A|,
    so a far off-policy token cannot blow up the update (0: off; else > 1, commonly 3)."""
    policy_ratio: Literal["token", "sequence"] = "token"
    """'token' (PPO: one ratio per token) or 'sequence' (GSPO: the geometric mean of a sequence's token ratios,
    clipped per sequence; use with a small clip such as 3e-4 / 4e-4 and critic-free algorithms)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How token losses become the minibatch loss, always over the whole minibatch of every rank:
    'token_mean' (sum / tokens), 'seq_mean_token_mean' (mean over sequences of each one's token mean, GRPO's
    paper), 'seq_mean_token_sum_norm' (token sum / (sequences x sampling.max_new_tokens), Dr. GRPO)."""
    advantage_norm: Literal["auto", "group", "batch", "none"] = "auto"
    """Critic-free advantage scale: 'group' (divide by the group's score std, GRPO), 'batch' (by the batch's
    score std, LitePPO), 'none' (Dr. GRPO; RLOO's own); 'auto': group for grpo, none for rloo."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose scores are all equal (no learning signal) are dropped and counted
    (``reject/zero_variance``); the learner grants more rollouts and still trains on full batches."""
    truncated: Literal["keep", "mask", "overlong_penalty"] = "keep"
    """Responses cut at sampling.max_new_tokens: 'keep' (train on them as they are), 'mask' (out of the loss,
    still in their group's baseline) or 'overlong_penalty' (DAPO's soft penalty on the score, overlong_buffer)."""
    overlong_buffer: int = 0
    """For truncated='overlong_penalty': responses longer than max_new_tokens - overlong_buffer lose up to
    ``overlong_penalty``, linearly in the excess length (0: a quarter of sampling.max_new_tokens)."""
    overlong_penalty: float = 1.0
    """The score a response at exactly sampling.max_new_tokens tokens loses with truncated='overlong_penalty'."""
    value_clip: float = 0.2
    """Clip range of the value loss around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    target_kl: float = 0.0
    """Early stop (0 = off): after each minibatch step, when approx KL(proximal || new) of the minibatch just
    trained, measured in its forward pass (so before its own step: the drift of the earlier steps), averaged over
    every rank's tokens, exceeds this, the update's remaining minibatches and epochs are skipped."""
    kl_coef: float = 0.05
    """Initial coefficient of the KL penalty to the reference (base) policy in the reward: per token
    ``-kl_coef * k1``. With a critic it is a reward (GAE); critic-free it is subtracted from every token's
    advantage as the penalty-to-go *after* the group normalisation, so it never changes a group's score
    ranking and acts at its own scale."""
    kl_loss_coef: float = 0.0
    """Weight of a KL-to-reference term in the loss, as GRPO's paper and TRL do (0: none); estimator
    ``kl_loss_estimator``."""
    kl_loss_estimator: Literal["k2", "k3"] = "k2"
    """KL estimator of the loss term: 'k2' (0.5 r^2: its gradient is that of each token's KL(pi || ref)) or
    'k3' ((e^-r - 1) + r, GRPO's: unbiased value, but its gradient is that of the reverse KL(ref || pi));
    'k1' is refused (its expected gradient is 0)."""
    kl_estimator: Literal["k1"] = "k1"
    """KL estimator in the reward (kl_coef): only 'k1' (log pi - log ref), the one whose score-function
    gradient is the KL gradient; k2 and k3 are refused there (see docs/algorithms.md)."""
    kl_target: float = 0.0
    """Target KL per sequence for the adaptive controller (0 = fixed coefficient)."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive KL controller, in sequences (of all ranks)."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over each batch."""
    is_cap: float = 2.0
    """Truncation of the off-policy importance weight proximal/behaviour (is_correction='truncate')."""
    is_correction: Literal["truncate", "token_mask", "sequence_mask"] = "truncate"
    """Off-policy correction of each token's loss by w = pi_proximal / pi_behaviour: 'truncate' (weight
    min(w, is_cap)), 'token_mask' (tokens with w outside [is_low, is_high] are left out, the others weighted
    by w: IcePop), 'sequence_mask' (sequences whose geometric-mean w is outside [is_low, is_high] are left out,
    the others weighted by min(w, is_cap)). ``is/masked_frac`` counts what was left out."""
    is_low: float = 0.5
    """Lower bound of the kept importance weights for the masking corrections."""
    is_high: float = 2.0
    """Upper bound of the kept importance weights for the masking corrections."""
    max_policy_lag: int = 2
    """Sequences sampled more than this many versions ago are dropped (counted). 0: strictly on-policy, every
    batch sampled with the newest policy and generation paused while the learner trains (deterministic with
    one actor and fixed seeds)."""
    value_model: Literal["separate", "shared"] = "separate"
    """'separate' (own LoRA trunk over the shared frozen base + head) or 'shared' (head on the policy trunk)."""
    full_finetune: bool = False
    """Train every policy weight instead of LoRA adapters (needs much more memory)."""
    reference_on: Literal["learner", "actors"] = "learner"
    """Who computes reference log-probs for the KL penalty: 'learner' (one more trunk pass per update) or
    'actors' (each actor scores its own batch with adapters off: the work scales out with the actors)."""

    @property
    def is_critic_free(self) -> bool:
        return self.algorithm in ("grpo", "rloo")


@dataclass(frozen=True)
class TransportConfig:
    """``[transport]``: sockets, timeouts and keys between actors and learners."""

    host: str = "127.0.0.1"
    """Address the learner binds (loopback unless told otherwise)."""
    experience_hwm: int = 2
    """Experience batches an actor may queue before the learner's back-pressure blocks it."""
    buffer_batches: int = 1
    """Learner buffer capacity, in update batches; it stops reading experience when full (back-pressure)."""
    heartbeat_s: float = 2.0
    """Seconds between heartbeats."""
    startup_timeout_s: float = 300.0
    """How long an actor waits for the learner's welcome and first snapshot."""
    actor_timeout_s: float = 120.0
    """An actor silent this long counts as gone: logged, its rollout grant released. It may come back."""
    learner_timeout_s: float = 60.0
    """An actor that hears nothing from its learner this long logs it as gone silent and asks again with
    backoff (1, 2, 4 ... 30 s) until a learner answers; it keeps at most one batch meanwhile."""
    max_message_mb: int = 256
    """Messages larger than this are rejected unread."""
    chunk_mb: float = 16.0
    """A policy snapshot larger than this (full fine-tuning) is announced, and each actor fetches it in chunks
    of this size, a few at a time (at most ``max_message_mb`` each); 0 sends every snapshot whole."""
    share_snapshots: bool = True
    """Actors on the learner's machine read each snapshot from a shared-memory file instead of receiving its
    bytes over a socket; actors elsewhere fetch it in chunks."""
    keys_dir: str = ""
    """Folder with the run's ZeroMQ CURVE keys (``python launch.py keys DIR`` makes them); every socket is then
    encrypted and the learner admits only actors holding a key from it. Required when ``host`` is not loopback."""
    local_auth: bool = False
    """CURVE for a run on this machine too: the launcher makes keys in ``<run_dir>/keys`` (folder 0700, secrets
    0600) unless ``keys_dir`` is set. Without it any local process can connect to the loopback ports."""


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: what to train on and for how long, where to write, how to recover. One attribute per
    ``run.key`` setting, so more than a dozen."""

    run_dir: str = "runs/latest"
    """Where the run writes its config, logs, metrics and checkpoints."""
    seed: int = 0
    """Seed for model initialisation, prompt order and sampling."""
    task: str = "arithmetic"
    """Built-in task (prompts + reward): arithmetic, length, letters, sentiment, format."""
    prompts: str = ""
    """Prompt source; '' takes the task's own. A .jsonl file (one object a line: "prompt" and optional extra
    fields the reward takes as keyword arguments), a .txt file (one prompt a line), or hf:NAME[:SPLIT[:FIELD]]
    (a Hugging Face dataset; needs the datasets package and a network)."""
    reward: str = ""
    """Reward; '' takes the task's own. module:function (any importable function: (prompt, completion) ->
    float, or with attribute batched = True (prompts, completions) -> list of floats), or rm:PATH (a reward
    model saved by 'launch.py train-rm')."""
    max_updates: int = 20
    """Stop after this many updates."""
    sync_every: int = 1
    """Publish new adapters to actors every N updates."""
    checkpoint_every: int = 10
    """Save a checkpoint every N updates (and at the end)."""
    min_actors: int = 0
    """Start training once this many actors have joined (or transport.startup_timeout_s has passed), so that
    early batches are not all from the fastest-starting actor; 0 starts with the first batch."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints in ``<run_dir>/checkpoints``."""
    backend: Literal["ring", "mpi", "nccl", "jaccl"] = "ring"
    """mlx.distributed backend of the learner ranks: ring (what ``--learners M`` sets up on one machine), or
    mpi, nccl, jaccl for ranks started by ``mlx.launch``/``mpirun`` with that backend's environment."""
    max_actor_restarts: int = 3
    """The launcher restarts a failed actor (after 1, 2, 4 ... s) up to this many times in all; then the run stops."""
    reward_timeout_s: float = 10.0
    """A reward call taking longer is abandoned: the sequence scores NaN and its group is dropped (0: no limit)."""
    environment: str = ""
    """Multi-turn episodes (actors/environments.py): '' trains single-turn completions scored by the reward;
    a registry name (guess_number, calculator, python), whose environment brings its own offline records, or
    module:Class, whose records are run.prompts' (a .jsonl object a line, every field given to ``reset``). The
    episode's return (sum of its step rewards) is its score: run.reward is not used and must stay ''."""
    env_step_timeout_s: float = 30.0
    """An environment's ``reset`` or ``step`` taking longer ends its episode (``env_timeouts``): scored NaN,
    its group dropped and counted, never trained on."""
    max_observation_chars: int = 4000
    """An environment answer longer than this is cut to it (``observation_cuts``)."""
    collective_timeout_s: float = 120.0
    """With several learner ranks: a gradient or statistics exchange not done after this long means a rank
    or the network between ranks is gone; the rank prints where it waited and exits instead of hanging."""
    metrics_sinks: tuple[Literal["tensorboard", "wandb"], ...] = ()
    """Also send the metrics to: tensorboard (tensorboardX, into <run_dir>/tensorboard), wandb. Each needs
    its package installed; metrics.jsonl is always written."""


@dataclass(frozen=True)
class Config:
    """The whole tree: one attribute per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ppo: PPOUpdateConfig = field(default_factory=PPOUpdateConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    run: RunConfig = field(default_factory=RunConfig)


def max_response_tokens(cfg: Config) -> int:
    """Response tokens a sequence may hold: ``sampling.max_new_tokens``, or with ``run.environment`` fewer than
    ``sampling.max_episode_tokens`` (every turn of an episode is in its response)."""
    return cfg.sampling.max_episode_tokens - 1 if cfg.run.environment else cfg.sampling.max_new_tokens
