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

__all__ = ["Task", "TaskSetupError", "get_task", "resolve_task"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


def resolve_task(cfg: Config) -> Task:
    """The task an actor runs: ``run.task`` with ``run.prompts`` and ``run.reward`` applied, and its batch
    ``scorer`` (per-sample time limit ``run.reward_timeout_s``). Any problem raises ``TaskSetupError``."""
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
