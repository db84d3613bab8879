"""Prompts and rewards chosen by configuration (``run.prompts``, ``run.reward``), each reward as a batch scorer.

Prompts: '' (the task's own), a ``.jsonl`` file (an object a line with a "prompt" string; every other field is an
*extra* of that prompt), a ``.txt`` file (a prompt a line, blank lines skipped), or ``hf:NAME[:SPLIT[:FIELD]]``
(a Hugging Face dataset: the ``datasets`` package and a network; other columns become extras).

Rewards: '' (the task's own), ``module:function`` or ``rm:PATH`` (a reward model, ``common/reward_model.py``).
A function is per sample, ``(prompt, completion, **extras) -> float``, or batched when it has the attribute
``batched = True``: ``(prompts, completions, **extras) -> list[float]``, each extra then a list aligned with
the prompts (None where a prompt lacks it), as TRL passes dataset columns. A function gets only the extras it
names (or all, with ``**kwargs``), so a plain ``(prompt, completion)`` function works with any prompt file.

Every reward is used through a ``Scorer``: ``(prompts, completions) -> list[float]`` for a whole batch, NaN where
the reward raised, ran past its time limit or gave a non-finite number (``actors/scoring.py``; the learner drops
that group).
A ``module:function`` plugin runs in a child process that is killed when it hangs (``actors/reward_process.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.builtin_tasks import TASKS, Scorer, Task, TaskSetupError
from actors.scoring import BatchedScorer, PerSampleScorer, import_function

if TYPE_CHECKING:
    from common.config import Config, ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["Scorer", "load_prompts", "load_prompt_records", "load_reward", "task_problems"]

Extras = dict[str, dict[str, Any]]


def load_prompts(spec: str, task: Task) -> tuple[str, ...]:
    """The prompts ``spec`` (``run.prompts``) names; '' gives ``task.prompts``. Problems raise TaskSetupError."""
    return load_prompt_records(spec)[0] if spec else task.prompts


def load_prompt_records(spec: str) -> tuple[tuple[str, ...], Extras]:
    """Prompts from a .jsonl/.txt file or ``hf:...`` and each prompt's extra fields (by prompt text)."""
    if spec.startswith("hf:"):
        records = _read_hf(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TaskSetupError(f"run.prompts={spec!r}: no such file ({path.resolve()})")
        records = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_txt(path)
    if not records:
        raise TaskSetupError(f"run.prompts={spec!r}: no prompts in it")
    extras: Extras = {}
    conflicts = 0
    for record in records:
        prompt, fields = record["prompt"], {k: v for k, v in record.items() if k != "prompt"}
        if fields and extras.setdefault(prompt, fields) != fields:
            conflicts += 1
    if conflicts:  # extras are looked up by prompt text: one text can carry one set
        logger.warning(
            "%s: %d repeated prompt(s) with other extra fields; the first ones are used", spec, conflicts
        )
    return tuple(r["prompt"] for r in records), extras


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records, problems = [], []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            problems.append(f"line {number}: not JSON ({e})")
            continue
        except RecursionError:  # a hostile or broken line of thousands of nested brackets
            problems.append(f"line {number}: JSON nested too deeply")
            continue
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            problems.append(f'line {number}: expected an object with a "prompt" string')
            continue
        records.append(record)
    if problems:
        shown = "\n  ".join(problems[:10]) + (
            f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise TaskSetupError(f"run.prompts={str(path)!r}: {len(problems)} bad line(s):\n  {shown}")
    return records


def _read_txt(path: Path) -> list[dict[str, Any]]:
    return [{"prompt": line} for line in _text(path).splitlines() if line.strip()]


def _text(path: Path) -> str:
    """The file as UTF-8; invalid bytes raise TaskSetupError naming the file and where (not a bare traceback)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskSetupError(
            f"run.prompts={str(path)!r} is not UTF-8 text: {e.reason} at byte {e.start}"
        ) from e


def _read_hf(spec: str) -> list[dict[str, Any]]:
    name, split, column = (spec[3:].split(":") + ["train", "prompt"])[:3]
    try:
        import datasets
    except ImportError as e:
        raise TaskSetupError(
            f"run.prompts={spec!r} needs the 'datasets' package (pip install datasets) and a network; "
            "offline, export the prompts to a .jsonl file and point run.prompts at it"
        ) from e
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many kinds: offline, unknown name or split, auth
        raise TaskSetupError(
            f"run.prompts={spec!r}: could not load dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {e}); without a network, export the prompts to a .jsonl file"
        ) from e
    if column not in table.column_names:
        raise TaskSetupError(f"run.prompts={spec!r}: no column {column!r}; columns: {table.column_names}")
    return [{**row, "prompt": str(row[column])} for row in table]


def encode_prompts(tokenizer, texts, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Chat-formatted token ids of each usable prompt and its text; empty prompts and prompts over
    ``max_tokens`` (``sampling.max_prompt_tokens``) are left out and logged. None usable: ValueError."""
    from common.models import chat_prompt_ids  # MLX: only where prompts are encoded

    ids, kept, empty, too_long = [], [], 0, []
    for text in texts:
        if not text.strip():
            empty += 1
            continue
        encoded = chat_prompt_ids(tokenizer, text)
        if len(encoded) > max_tokens:
            too_long.append(len(encoded))
            continue
        ids.append(encoded)
        kept.append(text)
    if empty or too_long:
        logger.warning(
            "left out %d empty prompt(s) and %d longer than sampling.max_prompt_tokens=%d (up to %d tokens)",
            empty,
            len(too_long),
            max_tokens,
            max(too_long, default=0),
        )
    if not ids:
        raise ValueError(f"no usable prompt among {len(texts)}: all empty or over {max_tokens} tokens")
    return ids, kept


def load_reward(
    spec: str, task: Task, timeout_s: float = 0.0, model_cfg: ModelConfig | None = None
) -> Scorer:
    """The batch scorer ``spec`` (``run.reward``) names; '' scores with ``task.reward``.

    ``timeout_s`` limits each sample (a batched call gets ``timeout_s`` x its size); ``model_cfg`` says where
    a reward model's base is cached and its dtype. Problems raise TaskSetupError.
    """
    if not spec:
        return PerSampleScorer(task.reward, task.extras, timeout_s)
    if spec.startswith("rm:"):
        from common.config import ModelConfig
        from common.reward_model import load_reward_model

        try:
            model = load_reward_model(spec[3:], model_cfg or ModelConfig())
        except (OSError, ValueError) as e:
            raise TaskSetupError(f"run.reward={spec!r}: {e}") from e
        return BatchedScorer(model.score, {}, timeout_s)
    fn = import_function(spec)  # here too: an import error is a setup error, said at once
    from actors.reward_process import ProcessScorer

    return ProcessScorer(spec, task.extras, timeout_s, batched=getattr(fn, "batched", False) is True)


def task_problems(cfg: Config) -> list[str]:
    """What would stop actors from setting up ``cfg``'s task, found without loading prompts or models: an
    unknown task, a missing prompt file or reward model, a reward function that cannot be imported. For the
    launcher to check once before starting anything. With ``run.environment`` no task or reward is used: the
    environment's problems alone (``actors.environments.environment_problems``)."""
    from common.reward_model import RM_CONFIG

    r, problems = cfg.run, []
    if r.environment:
        from actors.environments import environment_problems

        return environment_problems(cfg)
    if r.task not in TASKS:
        problems.append(f"unknown task {r.task!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    if r.prompts and not r.prompts.startswith("hf:") and not Path(r.prompts).expanduser().is_file():
        problems.append(f"run.prompts={r.prompts!r}: no such file")
    if r.reward.startswith("rm:") and not (Path(r.reward[3:]).expanduser() / RM_CONFIG).is_file():
        problems.append(f"run.reward={r.reward!r}: no {RM_CONFIG} there (save one with 'launch.py train-rm')")
    elif r.reward and not r.reward.startswith("rm:"):
        try:
            import_function(r.reward)
        except TaskSetupError as e:
            problems.append(str(e))
    return problems
