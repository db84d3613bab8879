"""Peer baseline: mlx-lm-lora's GRPO on one of our tasks, for a wall-clock budget or a number of steps.

Run with the peer environment's python (``bench/peer_env.py``), from anywhere::

    .venv-peer/bin/python bench/peer_mlx_lm_lora.py --model DIR --task arithmetic --budget-s 180 --out-dir OUT

or with any python that has mlx, mlx-lm, transformers and tqdm, with mlx-lm-lora's wheel unpacked beside
(``pip install --no-deps --target SITE mlx_lm_lora-5.10.2-py3-none-any.whl``; its GRPO path needs nothing else),
e.g. on the GPU host of ``bench/cuda_bench.sh e2e``, timing steps of issue 17's shape::

    PYTHONPATH=SITE:/root/cudasite:$PWD python3 bench/peer_mlx_lm_lora.py --model /tmp/smollm-bf16 \
        --task arithmetic --steps 2 --prompts-per-step 16 --group-size 8 --max-new-tokens 256 --lora-rank 16 \
        --lora-alpha 32 --beta 0.04 --label 135m --out-dir OUT

What is measured per optimizer step (``steps`` in ``peer_run.json``, written after every step): ``step_s``, the
wall-clock seconds since the previous step ended (the first step's from the end of model loading, so it holds
MLX's kernel warm-up), ``generate_s``, the part spent in its ``generate_grpo`` (timed by a wrapper around that
function), and the completions' mean length as it reports it (``train_average_generated_tokens``).

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

The weights compute in ``--dtype``: 'auto' is float32 on the CPU (as ours there: common.models) and the checkpoint's
own dtype elsewhere, where the models are left as mlx-lm-lora's ``train.py`` loads them (LoRA tensors in float32).
MLX's compiled GPU kernels are kept where the launcher keeps ours (``common.machine_cache``).

The budget counts from the start of this script (model loading included). Past the deadline the reward raises
``BudgetExhausted`` before scoring anything, and the per-step callback raises it after an update: training stops
at the first of the two (or after ``--steps``), the adapters are saved, and ``peer_run.json`` in ``--out-dir``
records the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
DTYPES = ("auto", "float32", "bfloat16", "float16")


class BudgetExhausted(Exception):
    """The wall-clock budget is spent: raised through mlx-lm-lora's training loop to end it."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="an mlx-lm model folder")
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock seconds, from this script's start"
    )
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
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
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: float32 on the CPU, else the checkpoint's"
    )
    p.add_argument("--label", default="", help="a name for the run's record (e.g. the model size)")
    p.add_argument("--out-dir", type=Path, required=True, help="adapters, adapter_config.json, peer_run.json")
    args = p.parse_args(argv)
    if args.budget_s is None and args.steps is None:
        p.error("give --budget-s, --steps or both")
    return args


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
    ``generate_s`` is added to by the ``generate_grpo`` wrapper (``time_generation``); ``on_step`` gets the
    steps so far after each one (to save them).
    """

    def __init__(
        self, t_start: float, deadline: float, on_step: Callable[[list[dict]], None] | None = None
    ) -> None:
        self.t_start, self.deadline, self.on_step = t_start, deadline, on_step
        self.t_last = time.time()  # training starts: the first step counts from here
        self.generate_s = 0.0
        self.steps: list[dict[str, float]] = []

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        keys = ("iteration", "train_loss", "train_total_rewards_mean", "train_kl", "tokens_per_second")
        keys += ("train_average_generated_tokens", "iterations_per_second", "peak_memory")
        now = time.time()
        step = {"t": now, "step_s": now - self.t_last, "generate_s": self.generate_s}
        step |= {k: float(info[k]) for k in keys if k in info}
        self.steps.append(step)
        self.t_last, self.generate_s = now, 0.0
        elapsed, reward = step["t"] - self.t_start, step.get("train_total_rewards_mean", float("nan"))
        logger.info(
            "step %d done at %.1f s: %.2f s (generation %.2f s), mean reward %.3f",
            step["iteration"], elapsed, step["step_s"], step["generate_s"], reward,
        )  # fmt: skip
        if self.on_step is not None:
            self.on_step(self.steps)
        if step["t"] >= self.deadline:
            raise BudgetExhausted

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        """No validation set is given, so this is never called."""


def time_generation(clock: StepClock) -> None:
    """Wrap mlx-lm-lora's ``generate_grpo`` (``train_grpo`` calls it by its module-level name) so that each
    call's wall-clock time is added to ``clock.generate_s``; its tokens come back evaluated, so the time is
    the generation's own."""
    from mlx_lm_lora.trainer import grpo_trainer

    original = grpo_trainer.generate_grpo

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            clock.generate_s += time.time() - start

    grpo_trainer.generate_grpo = timed


def checkpoint_dtype(model: Any) -> Any:
    """The dtype most of ``model``'s floating parameters have (the checkpoint's; fresh LoRA tensors are float32)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sizes: dict[Any, int] = {}
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.size
    return max(sizes, key=sizes.get)


def to_run_dtype(model: Any, requested: str) -> None:
    """Cast ``model`` to the dtype ``common.models.compute_dtype`` picks, unless it is the checkpoint's own (then
    it stays as mlx-lm-lora loaded it)."""
    from common.models import compute_dtype

    dtype = compute_dtype(requested, checkpoint_dtype(model))
    if dtype != checkpoint_dtype(model):
        model.set_dtype(dtype)


def load_models(args: argparse.Namespace, beta: float) -> tuple[Any, Any, Any, Path]:
    """Policy with fresh LoRA adapters, frozen reference (None when beta is 0), tokenizer, adapter file.

    The checkpoint may be bf16; on the CPU both models compute in float32, as ours do (``to_run_dtype``).
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
    to_run_dtype(model, args.dtype)
    ref_model = None
    if beta != 0:  # as mlx-lm-lora's train.load_reference_model: the same checkpoint, frozen
        ref_model, _ = load(str(args.model))
        ref_model.freeze()
        to_run_dtype(ref_model, args.dtype)
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
        iters=args.steps or NEVER,
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


def versions() -> dict[str, str]:
    """The installed versions of what the peer runs on."""
    from importlib import metadata

    found = {}
    for name in ("mlx", "mlx-lm", "mlx-lm-lora", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def base_record(args: argparse.Namespace, t_start: float, deadline: float) -> dict[str, Any]:
    """What ``peer_run.json`` holds besides the steps: the system, versions, machine, command and settings."""
    from bench.machine import run_record

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    finite = deadline if math.isfinite(deadline) else None
    times = {"t_start": t_start, "deadline": finite, "warmup_steps": 1}
    return (
        {"system": "mlx-lm-lora", "label": args.label, "versions": versions(), **run_record()}
        | times
        | {
            "settings": settings,
            "sequences_per_step": args.prompts_per_step * args.group_size,
        }
    )


def train(args: argparse.Namespace, t_start: float) -> dict[str, Any]:
    """Train until the budget is spent or ``--steps`` are done; returns the run's record for ``peer_run.json``,
    which is also written after every step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    from actors.builtin_tasks import TASKS

    deadline = math.inf if args.budget_s is None else t_start + args.budget_s
    beta = GRPOTrainingArgs.beta if args.beta is None else args.beta
    np.random.seed(args.seed)  # its batch order
    mx.random.seed(args.seed)  # LoRA init and sampling
    model, ref_model, tokenizer, adapter_file = load_models(args, beta)
    dataset = build_dataset(tokenizer, TASKS[args.task].prompts)
    record = base_record(args, t_start, deadline) | {"beta": beta, "dtypes": float_dtypes(model)}
    clock = StepClock(t_start, deadline, lambda steps: save_record(args.out_dir, record, steps))
    time_generation(clock)
    record["t_train_start"] = clock.t_last
    logger.info("loaded in %.1f s as %s", clock.t_last - t_start, record["dtypes"])
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
    return save_record(args.out_dir, record, clock.steps)


def save_record(out_dir: Path, record: dict[str, Any], steps: list[dict]) -> dict[str, Any]:
    """``record`` with ``steps`` (and their ``step_s`` alone) written to ``out_dir/peer_run.json``."""
    full = record | {"steps": steps, "step_s": [s["step_s"] for s in steps]}
    (out_dir / "peer_run.json").write_text(json.dumps(full, indent=1))
    return full


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
    from common.machine_cache import keep_compiled_kernels

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reexec_with_fast_blas()  # before mlx is imported: the preload only takes at process start
    logger.info("MLX kernel cache: %s", keep_compiled_kernels())  # the launcher's: one warm cache serves both
    logger.info("LD_PRELOAD: %s", os.environ.get("LD_PRELOAD") or "none (only Linux needs one)")
    args = parse_args(argv)
    from bench.learning_rewards import LOG_ENV

    if not os.environ.get(LOG_ENV):
        logger.warning("$%s is not set: the rewards are computed but not logged", LOG_ENV)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train(args, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
