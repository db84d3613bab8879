"""Peer baseline of the learning benchmark: mlx-lm-lora's GRPO on one of our tasks, for a wall-clock budget.

Run with the peer environment's python (``bench/peer_env.py``), from anywhere::

    .venv-peer/bin/python bench/peer_mlx_lm_lora.py --model DIR --task arithmetic --budget-s 180 --out-dir OUT

It re-execs itself once with the optimized BLAS preloaded (``common.blas``), so no ``python -m common.blas``
wrapper is needed. Training goes through mlx-lm-lora's own code: ``utils.from_pretrained`` (LoRA on every linear
layer of every block), the reference model as its ``train.py`` loads it, Adam, and ``train_grpo`` with its
``GRPOTrainingArgs``. What we supply is the data and the reward, the same as our trainer's:

- each prompt's token ids are ``common.models.chat_prompt_ids`` (one user turn and the generation prompt;
  SmolLM2's template adds its own default system turn, for our actors too), given to its batcher as ready
  examples: its ``GRPODataset`` would put a "think/answer" system prompt of its own in front;
- the only reward (weight 1) is ``bench.learning_rewards.<task>``, registered in its reward registry and called
  with the original prompt text and the prompt's extras; it scores the completions sampled for the step and
  logs them with their time to ``$MLX_PPO_REWARD_LOG``;
- sampling is plain temperature sampling (``--top-p 1 --top-k 0``, ours) unless asked otherwise, and no
  ``</answer>`` stop string.

The budget counts from the start of this script (model loading included). Past the deadline the reward raises
``BudgetExhausted`` before scoring anything, and the per-step callback raises it after an update: training stops
at the first of the two, the adapters are saved, and ``peer_run.json`` in ``--out-dir`` records the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.peer_mlx_lm_lora")
TASK_NAMES = ("arithmetic", "format", "length")
NEVER = 10**9  # an iteration count / step interval that the budget always ends first


class BudgetExhausted(Exception):
    """The wall-clock budget is spent: raised through mlx-lm-lora's training loop to end it."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="an mlx-lm model folder")
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument(
        "--budget-s", type=float, required=True, help="wall-clock seconds, from this script's start"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--top-p", type=float, default=1.0, help="1 = off (ours); mlx-lm-lora's own default is 0.95"
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off (ours); mlx-lm-lora's own default is 20")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0, help="mlx-lm-lora's LoRA scale is alpha / rank")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (default: GRPOTrainingArgs')")
    p.add_argument("--out-dir", type=Path, required=True, help="adapters, adapter_config.json, peer_run.json")
    return p.parse_args(argv)


def make_reward(task: str, deadline: float) -> Callable[..., list[float]]:
    """Our logged reward of ``task`` in mlx-lm-lora's reward signature, registered in its registry.

    mlx-lm-lora passes ``prompts`` as the examples' prompt text (the untemplated prompt here) expanded to one
    per completion; the prompt's extras (``max_words``, ``json_keys`` of the format task) are looked up by it.
    """
    from mlx_lm_lora.trainer.grpo_reward_functions import get_reward_function, register_reward_function

    from actors.builtin_tasks import TASKS
    from bench import learning_rewards

    scorer = getattr(learning_rewards, task)
    extras = TASKS[task].extras
    keys = sorted({key for fields in extras.values() for key in fields})

    def reward(
        prompts: list[str], completions: list[str], answer: Any = None, types: Any = None
    ) -> list[float]:
        if time.time() >= deadline:
            raise BudgetExhausted
        kwargs = {key: [extras.get(p, {}).get(key) for p in prompts] for key in keys}
        return scorer(list(prompts), list(completions), **kwargs)

    name = f"mlx_ppo_{task}"
    reward.__name__ = name
    register_reward_function(name)(reward)
    return get_reward_function(name)


class StepClock:
    """mlx-lm-lora's training callback: records each step's time and metrics, ends training at the deadline.

    With ``steps_per_report=1`` its loop calls ``on_train_loss_report`` after every optimizer update.
    """

    def __init__(self, t_start: float, deadline: float) -> None:
        self.t_start, self.deadline = t_start, deadline
        self.steps: list[dict[str, float]] = []

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        keys = ("iteration", "train_loss", "train_total_rewards_mean", "train_kl", "tokens_per_second")
        step = {"t": time.time(), **{k: float(info[k]) for k in keys if k in info}}
        self.steps.append(step)
        elapsed, reward = step["t"] - self.t_start, step.get("train_total_rewards_mean", float("nan"))
        logger.info("step %d done at %.1f s: mean reward %.3f", step["iteration"], elapsed, reward)
        if step["t"] >= self.deadline:
            raise BudgetExhausted

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        """No validation set is given, so this is never called."""


def load_models(args: argparse.Namespace, beta: float) -> tuple[Any, Any, Any, Path]:
    """Policy with fresh LoRA adapters, frozen reference (None when beta is 0), tokenizer, adapter file.

    The checkpoint may be bf16; both models compute in float32 here, as ours do on the CPU (common.models).
    """
    import mlx.core as mx
    from mlx_lm.utils import load
    from mlx_lm_lora.utils import from_pretrained

    lora = {
        "rank": args.lora_rank,
        "dropout": 0.0,
        "scale": args.lora_alpha / args.lora_rank,
        "num_layers": -1,
    }
    model, tokenizer, adapter_file = from_pretrained(
        model=str(args.model), new_adapter_path=str(args.out_dir), lora_config=lora
    )
    model.set_dtype(mx.float32)
    ref_model = None
    if beta != 0:  # as mlx-lm-lora's train.load_reference_model: the same checkpoint, frozen
        ref_model, _ = load(str(args.model))
        ref_model.freeze()
        ref_model.set_dtype(mx.float32)
        mx.eval(ref_model.parameters())
    mx.eval(model.parameters())
    return model, ref_model, tokenizer, Path(adapter_file)


def float_dtypes(model: Any) -> list[str]:
    """The dtypes of ``model``'s floating parameters (what it computes in), to record with the run."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return sorted(
        {str(p.dtype) for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}
    )


def build_dataset(tokenizer: Any, prompts: Sequence[str]) -> list[tuple[list[int], list[int], str, str]]:
    """Examples as mlx-lm-lora's GRPO batcher takes them: (prompt ids, answer ids, prompt text, answer text)."""
    from common.models import chat_prompt_ids

    return [(chat_prompt_ids(tokenizer, p), [], p, "") for p in prompts]


def grpo_args(args: argparse.Namespace, beta: float, adapter_file: Path) -> Any:
    """``GRPOTrainingArgs``: ours where we have a setting, its own defaults (epsilon, loss type) elsewhere."""
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs

    return GRPOTrainingArgs(
        batch_size=args.prompts_per_step,
        group_size=args.group_size,
        iters=NEVER,
        steps_per_report=1,
        steps_per_eval=NEVER,
        steps_per_save=NEVER,
        adapter_file=str(adapter_file),
        max_completion_length=args.max_new_tokens,
        beta=beta,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=0.0,
        reward_weights=[1.0],
    )


def train(args: argparse.Namespace, t_start: float) -> dict[str, Any]:
    """Train until the budget is spent; returns the run's record for ``peer_run.json``."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    from actors.builtin_tasks import TASKS

    deadline = t_start + args.budget_s
    beta = GRPOTrainingArgs.beta if args.beta is None else args.beta
    np.random.seed(args.seed)  # its batch order
    mx.random.seed(args.seed)  # LoRA init and sampling
    model, ref_model, tokenizer, adapter_file = load_models(args, beta)
    dataset = build_dataset(tokenizer, TASKS[args.task].prompts)
    clock, t_train = StepClock(t_start, deadline), time.time()
    logger.info(
        "loaded in %.1f s as %s; training until %.1f s", t_train - t_start, float_dtypes(model), args.budget_s
    )
    try:
        train_grpo(
            model=model,
            ref_model=ref_model,
            tokenizer=tokenizer,
            optimizer=optim.Adam(learning_rate=args.learning_rate),  # its train.py's default optimizer
            train_dataset=dataset,
            reward_funcs=[make_reward(args.task, deadline)],
            args=grpo_args(args, beta, adapter_file),
            training_callback=clock,
            end_answer_token="",
        )
    except BudgetExhausted:
        logger.info("budget of %.0f s spent after %d steps", args.budget_s, len(clock.steps))
    mx.save_safetensors(str(adapter_file), dict(tree_flatten(model.trainable_parameters())))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    times = {"t_start": t_start, "t_train_start": t_train, "deadline": deadline}
    run = {"beta": beta, "dtypes": float_dtypes(model), "settings": settings, "steps": clock.steps}
    return times | run


def use_repo_root() -> None:
    """Import from the repository root, not from bench/, which python puts first for a script (its
    ``distributed.py``, ``generation.py``, ... would shadow modules of those names)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.time()
    use_repo_root()
    from common.blas import reexec_with_fast_blas

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reexec_with_fast_blas()  # before mlx is imported: the preload only takes at process start
    logger.info("LD_PRELOAD: %s", os.environ.get("LD_PRELOAD") or "none (only Linux needs one)")
    args = parse_args(argv)
    from bench.learning_rewards import LOG_ENV

    if not os.environ.get(LOG_ENV):
        logger.warning("$%s is not set: the rewards are computed but not logged", LOG_ENV)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = train(args, t_start)
    (args.out_dir / "peer_run.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
