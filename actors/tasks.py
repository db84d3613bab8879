"""The task an actor runs, by name: a built-in task (``actors/builtin_tasks.py``) with its prompts and reward
replaced by ``run.prompts`` / ``run.reward`` when set (``actors/rewards.py`` reads those)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from actors.builtin_tasks import TASKS, Task, TaskSetupError
from actors.rewards import load_prompt_records, load_reward

if TYPE_CHECKING:
    from common.config import Config

logger = logging.getLogger(__name__)

__all__ = ["Task", "TaskSetupError", "environment_task", "get_task", "resolve_task"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


def resolve_task(cfg: Config) -> Task:
    """The task an actor runs: ``run.task`` with ``run.prompts`` and ``run.reward`` applied, and its batch
    ``scorer`` (per-sample time limit ``run.reward_timeout_s``); with ``run.environment`` the environment's
    task (``environment_task``). Any problem raises ``TaskSetupError``."""
    if cfg.run.environment:
        return environment_task(cfg)
    try:
        task = get_task(cfg.run.task)
    except ValueError as e:
        raise TaskSetupError(str(e)) from e
    if task.check is not None and not cfg.run.reward:
        task.check()
    if cfg.run.prompts:
        prompts, extras = load_prompt_records(cfg.run.prompts)
        task = dataclasses.replace(task, prompts=prompts, extras=extras)
    scorer = load_reward(cfg.run.reward, task, cfg.run.reward_timeout_s, cfg.model)
    logger.info(
        "%d prompts from %s; reward %s",
        len(task.prompts),
        cfg.run.prompts or f"task {task.name}",
        cfg.run.reward or f"of task {task.name}",
    )
    return dataclasses.replace(task, scorer=scorer)


def environment_task(cfg: Config) -> Task:
    """The task of a ``run.environment`` run: the environment class and its records (``run.prompts``' when set,
    else the class's own ``records()``); no reward, no scorer (an episode's return is its score)."""
    from actors.environments import environment_problems, load_environment

    if problems := environment_problems(cfg):
        raise TaskSetupError("; ".join(problems))
    cls = load_environment(cfg.run.environment)
    if cfg.run.prompts:
        prompts, extras = load_prompt_records(cfg.run.prompts)
        records = tuple({**extras.get(p, {}), "prompt": p} for p in prompts)
    else:
        try:
            records = tuple(dict(r) for r in cls.records())
        except Exception as e:  # an environment's own code: its failure is a setup error, said at once
            raise TaskSetupError(f"run.environment={cfg.run.environment!r}: records() failed: {e!r}") from e
    if not records or not all(isinstance(r.get("prompt", ""), str) for r in records):
        raise TaskSetupError(f'run.environment={cfg.run.environment!r}: no records, or a non-text "prompt"')
    source = cfg.run.prompts or "its records()"
    logger.info("environment %s: %d records from %s", cfg.run.environment, len(records), source)
    prompts = tuple(str(r.get("prompt", "")) for r in records)
    name = f"environment {cfg.run.environment}"
    return Task(name, prompts, _no_reward, "multi-turn episodes", environment=cls, records=records)


def _no_reward(prompt: str, completion: str) -> float:
    raise TaskSetupError("an environment run scores episodes by their returns, not by a reward function")
