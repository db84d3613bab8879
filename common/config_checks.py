"""Range and consistency checks of a built ``Config``: every problem, with the values, listed at once.

A mode's allowed values are its ``Literal`` type in ``common.options``; ``mode_problems`` reads them from there.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from common.network import exposed_without_keys, needs_keys_message
from common.options import Config, PPOUpdateConfig, max_response_tokens

WHY_REFUSED = {
    "ppo.kl_estimator": (
        "only k1 may go into the reward. Through a reward only E[kl * grad log pi] reaches the policy: the KL "
        "gradient for k1, not for k2 or k3 (k3's points away from the reference about half the time); for k2/k3 "
        "use the loss term (kl_loss_coef, kl_loss_estimator)"
    ),
    "ppo.kl_loss_estimator": (
        "use k2 (exact KL gradient) or k3. Not k1: as a loss k1 = log pi - log ref has expected gradient "
        "E[grad log pi] = 0 on the policy's own samples (no pull to the reference)"
    ),
}
"""Why a mode refuses the values its type leaves out, where a bare list of the allowed ones would not say."""


def mode_problems(cfg: Config) -> list[str]:
    """Every setting whose value is not among its ``Literal`` type's (for a tuple: of its items' type)."""
    p: list[str] = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for name, kind in typing.get_type_hints(type(values)).items():
            where, value = f"{section.name}.{name}", getattr(values, name)
            if typing.get_origin(kind) is tuple:
                p += _unknown_items(where, value, typing.get_args(kind)[0])
            elif typing.get_origin(kind) is typing.Literal and value not in typing.get_args(kind):
                why = WHY_REFUSED.get(where) or f"use {', '.join(typing.get_args(kind))}"
                p.append(f"{where}={value!r}: {why}")
    return p


def _unknown_items(where: str, values: tuple, kind: Any) -> list[str]:
    if typing.get_origin(kind) is not typing.Literal:
        return []
    unknown = sorted(set(values) - set(typing.get_args(kind)))
    return [f"{where}: unknown {unknown}; use {', '.join(typing.get_args(kind))}"] if unknown else []


def validate(cfg: Config) -> list[str]:
    """Every problem with ``cfg``, each saying what is wrong and with which values; empty when it can run."""
    p: list[str] = []
    m, lo, s = cfg.model, cfg.lora, cfg.sampling
    if not m.name.strip():
        p.append("model.name is empty: use default, tiny, a model folder or a Hugging Face id")
    if m.adapters and not (Path(m.adapters) / "adapters.safetensors").is_file():
        p.append(f"model.adapters={m.adapters!r}: no adapters.safetensors there (an mlx-lm adapter folder)")
    if lo.rank < 1:
        p.append(f"lora.rank={lo.rank} must be >= 1")
    if lo.alpha <= 0:
        p.append(f"lora.alpha={lo.alpha} must be > 0")
    if not 0.0 <= lo.dropout < 1.0:
        p.append(f"lora.dropout={lo.dropout} must be in [0, 1)")
    if lo.num_layers == 0 or lo.num_layers < -1:
        p.append(f"lora.num_layers={lo.num_layers} must be -1 (all blocks) or >= 1")
    if not s.temperature > 0:
        p.append(
            f"sampling.temperature={s.temperature} must be > 0 (behaviour log-probs need a distribution)"
        )
    if s.max_new_tokens < 1:
        p.append(f"sampling.max_new_tokens={s.max_new_tokens} must be >= 1")
    if s.max_prompt_tokens < 1:
        p.append(f"sampling.max_prompt_tokens={s.max_prompt_tokens} must be >= 1")
    if s.batch_size < 1:
        p.append(f"sampling.batch_size={s.batch_size} must be >= 1")
    return mode_problems(cfg) + p + validate_ppo(cfg.ppo) + validate_run(cfg) + validate_transport(cfg)


def validate_run(cfg: Config) -> list[str]:
    """Problems with the ``[run]`` section, and of its options with those of other sections."""
    r, p = cfg.run, []
    if r.min_actors < 0:
        p.append(f"run.min_actors={r.min_actors} must be >= 0")
    for name in ("max_updates", "sync_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(r, name) < 1:
            p.append(f"run.{name}={getattr(r, name)} must be >= 1")
    if r.max_actor_restarts < 0:
        p.append(f"run.max_actor_restarts={r.max_actor_restarts} must be >= 0")
    p += validate_sources(r.prompts, r.reward)
    if r.reward_timeout_s < 0:
        p.append(f"run.reward_timeout_s={r.reward_timeout_s} must be >= 0 (0: no limit)")
    if not r.collective_timeout_s > 0:
        p.append(f"run.collective_timeout_s={r.collective_timeout_s} must be > 0")
    if cfg.sampling.batch_size % cfg.ppo.group_size:
        p.append(
            f"sampling.batch_size={cfg.sampling.batch_size} must be a multiple of ppo.group_size={cfg.ppo.group_size}"
        )
    if cfg.ppo.truncated == "overlong_penalty" and cfg.ppo.overlong_buffer > max_response_tokens(cfg):
        budget = "sampling.max_episode_tokens - 1" if r.environment else "sampling.max_new_tokens"
        p.append(
            f"ppo.overlong_buffer={cfg.ppo.overlong_buffer} must be at most the response budget "
            f"{max_response_tokens(cfg)} ({budget})"
        )
    steps = r.max_updates * cfg.ppo.update_epochs * cfg.ppo.num_minibatches
    if cfg.ppo.warmup_steps >= steps and (cfg.ppo.warmup_steps or cfg.ppo.lr_schedule != "constant"):
        p.append(
            f"ppo.warmup_steps={cfg.ppo.warmup_steps} is not below the run's {steps} optimizer steps "
            "(run.max_updates x update_epochs x num_minibatches): the learning rate would never reach its peak"
        )
    if cfg.sampling.max_rows < 0:
        p.append(f"sampling.max_rows={cfg.sampling.max_rows} must be >= 0 (0: the whole batch at once)")
    return p + validate_environment(cfg)


_IDENTIFIER = r"[A-Za-z_]\w*"
_FUNCTION_SPEC = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}")


def validate_environment(cfg: Config) -> list[str]:
    """Problems with the multi-turn settings (``run.environment`` and its limits). Whether the environment
    loads is the actors' check (``actors.environments.environment_problems``, run by the launcher before
    anything starts): only they import it, possibly on other machines."""
    r, s, p = cfg.run, cfg.sampling, []
    named = re.fullmatch(_IDENTIFIER, r.environment) or _FUNCTION_SPEC.fullmatch(r.environment)
    if r.environment and not named:
        p.append(
            f"run.environment={r.environment!r}: use a registry name (guess_number, calculator, python), "
            "module:Class (e.g. my_envs:Game), or '' (single-turn)"
        )
    if not r.env_step_timeout_s > 0:
        p.append(f"run.env_step_timeout_s={r.env_step_timeout_s} must be > 0")
    if r.max_observation_chars < 1:
        p.append(f"run.max_observation_chars={r.max_observation_chars} must be >= 1")
    if not r.environment:
        return p
    if s.max_episode_tokens <= s.max_new_tokens:
        p.append(
            f"sampling.max_episode_tokens={s.max_episode_tokens} must exceed sampling.max_new_tokens="
            f"{s.max_new_tokens}: an episode needs room for at least one whole model turn"
        )
    if r.reward:
        p.append(
            f"run.reward={r.reward!r} is not used with run.environment={r.environment!r}: an episode's score "
            "is the sum of the environment's step rewards; remove run.reward"
        )
    return p


def validate_transport(cfg: Config) -> list[str]:
    """Problems with the ``[transport]`` section."""
    t, p = cfg.transport, []
    for name in ("experience_hwm", "buffer_batches", "max_message_mb"):
        if getattr(t, name) < 1:
            p.append(f"transport.{name}={getattr(t, name)} must be >= 1")
    if not 0 <= t.chunk_mb < t.max_message_mb:
        p.append(f"transport.chunk_mb={t.chunk_mb} must be >= 0 and below max_message_mb={t.max_message_mb}")
    for name in ("heartbeat_s", "startup_timeout_s", "actor_timeout_s", "learner_timeout_s"):
        if not getattr(t, name) > 0:
            p.append(f"transport.{name}={getattr(t, name)} must be > 0")
    if exposed_without_keys([t.host], t.keys_dir):
        p.append(needs_keys_message(f"transport.host={t.host!r} is reachable from other machines"))
    return p


def validate_sources(prompts: str, reward: str) -> list[str]:
    """Format problems of ``run.prompts`` and ``run.reward`` (whether the files exist is the actors' check:
    only they read them, possibly on other machines)."""
    p: list[str] = []
    if prompts.startswith("hf:"):
        parts = prompts[3:].split(":")
        if len(parts) > 3 or not parts[0].strip() or not all(x.strip() for x in parts[1:]):
            p.append(f"run.prompts={prompts!r}: use hf:NAME, hf:NAME:SPLIT or hf:NAME:SPLIT:FIELD")
    elif prompts and not prompts.lower().endswith((".jsonl", ".txt")):
        p.append(
            f"run.prompts={prompts!r}: use a .jsonl or .txt file, hf:NAME[:SPLIT[:FIELD]], or '' (task's)"
        )
    if reward.startswith("rm:"):
        if not reward[3:].strip():
            p.append(f"run.reward={reward!r}: rm: needs the reward model's folder, rm:PATH")
    elif reward and not _FUNCTION_SPEC.fullmatch(reward):
        p.append(
            f"run.reward={reward!r}: use module:function (e.g. my_rewards:score), rm:PATH, or '' (the task's)"
        )
    return p


def validate_ppo(u: PPOUpdateConfig) -> list[str]:
    """Problems with the ``[ppo]`` section."""
    p: list[str] = []
    if u.is_critic_free and u.group_size < 2:
        p.append(f"ppo.group_size={u.group_size}: {u.algorithm} compares completions of a prompt, needs >= 2")
    if u.group_size < 1:
        p.append(f"ppo.group_size={u.group_size} must be >= 1")
    elif u.batch_size % u.group_size:
        p.append(f"ppo.batch_size={u.batch_size} must be a multiple of ppo.group_size={u.group_size}")
    if u.compute_threads < 0:
        p.append(f"ppo.compute_threads={u.compute_threads} must be >= 0 (0: one per core)")
    if u.num_minibatches < 1 or u.batch_size % u.num_minibatches:
        p.append(f"ppo.num_minibatches={u.num_minibatches} must divide ppo.batch_size={u.batch_size}")
    elif u.micro_batch_size < 1 or (u.batch_size // u.num_minibatches) % u.micro_batch_size:
        p.append(
            f"ppo.micro_batch_size={u.micro_batch_size} must divide the minibatch size "
            f"{u.batch_size} / {u.num_minibatches} = {u.batch_size // u.num_minibatches}"
        )
    if u.vocab_chunk < 0:
        p.append(f"ppo.vocab_chunk={u.vocab_chunk} must be >= 0 (0: the whole micro-batch at once)")
    if u.micro_batch_tokens < -1:
        p.append(f"ppo.micro_batch_tokens={u.micro_batch_tokens} must be -1 (auto), 0 (off) or > 0")
    if u.update_epochs < 1:
        p.append(f"ppo.update_epochs={u.update_epochs} must be >= 1")
    if u.max_policy_lag < 0:
        p.append(f"ppo.max_policy_lag={u.max_policy_lag} must be >= 0")
    for name in ("learning_rate", "clip_coef", "value_clip", "is_cap", "kl_horizon"):
        if not getattr(u, name) > 0:
            p.append(f"ppo.{name}={getattr(u, name)} must be > 0")
    for name in ("vf_coef", "ent_coef", "max_grad_norm", "target_kl", "kl_coef", "kl_target", "kl_loss_coef"):
        if getattr(u, name) < 0:
            p.append(f"ppo.{name}={getattr(u, name)} must be >= 0")
    if not (0 <= u.gamma <= 1 and 0 <= u.lam <= 1):
        p.append(f"ppo.gamma={u.gamma}, ppo.lam={u.lam} must be in [0, 1]")
    if u.reference_on == "actors" and u.full_finetune:
        p.append("ppo.reference_on='actors' needs LoRA: with ppo.full_finetune actors hold no frozen base")
    return p + validate_objective(u) + validate_schedule(u)


def validate_objective(u: PPOUpdateConfig) -> list[str]:
    """Problems with the objective menu of ``[ppo]`` (docs/algorithms.md)."""
    p: list[str] = []
    for name in ("clip_low", "clip_high", "overlong_penalty"):
        if getattr(u, name) < 0:
            p.append(f"ppo.{name}={getattr(u, name)} must be >= 0")
    if u.clip_low >= 1 or (u.clip_low == 0 and u.clip_coef >= 1):
        p.append(
            f"ppo.clip_low={u.clip_low or u.clip_coef} must be < 1 (the ratio's lower bound 1 - clip_low > 0)"
        )
    if u.dual_clip != 0 and not u.dual_clip > 1:
        p.append(f"ppo.dual_clip={u.dual_clip} must be 0 (off) or > 1")
    if not 0 < u.is_low < 1 < u.is_high:
        p.append(f"ppo.is_low={u.is_low}, ppo.is_high={u.is_high}: need 0 < is_low < 1 < is_high")
    if u.overlong_buffer < 0:
        p.append(f"ppo.overlong_buffer={u.overlong_buffer} must be >= 0 (0: a quarter of max_new_tokens)")
    if u.policy_ratio == "sequence" and not u.is_critic_free:
        p.append("ppo.policy_ratio='sequence' (GSPO) needs a sequence-level advantage: use grpo or rloo")
    elif u.policy_ratio == "sequence" and u.loss_aggregation != "seq_mean_token_mean":
        p.append(
            f"ppo.policy_ratio='sequence' (GSPO) averages over sequences: set ppo.loss_aggregation="
            f"'seq_mean_token_mean' (not {u.loss_aggregation!r}, which weights sequences by their length)"
        )
    if u.kl_target > 0 and u.kl_coef <= 0:
        p.append(
            f"ppo.kl_target={u.kl_target}: the adaptive controller scales ppo.kl_coef, which must start > 0"
        )
    if u.advantage_norm != "auto" and not u.is_critic_free:
        p.append(
            f"ppo.advantage_norm={u.advantage_norm!r} is for grpo/rloo; with a critic use whiten_advantages"
        )
    if u.dynamic_sampling and not u.is_critic_free:
        p.append("ppo.dynamic_sampling drops groups of equal scores: it needs grpo or rloo (group_size >= 2)")
    return p


def validate_schedule(u: PPOUpdateConfig) -> list[str]:
    """Problems with the learning-rate schedule of ``[ppo]``."""
    p: list[str] = []
    if u.warmup_steps < 0:
        p.append(f"ppo.warmup_steps={u.warmup_steps} must be >= 0")
    if not 0 <= u.min_lr_ratio <= 1:
        p.append(f"ppo.min_lr_ratio={u.min_lr_ratio} must be in [0, 1]")
    return p
