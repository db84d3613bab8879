"""Peer benchmark (issue 17, item 4c): seconds per GRPO optimizer step of TRL's ``GRPOTrainer`` on PyTorch.

Run with a Python that has torch, transformers, peft, accelerate, trl and datasets (no MLX, no vLLM), e.g.
on a GPU host with the wheels of ``.whltrl`` installed to /tmp/trlsite (``pip install --no-deps --target``)::

    PYTHONPATH=/tmp/trlsite:$PWD python3 bench/peer_trl.py --model DIR --steps 4 --max-new-tokens 256 \\
        --output OUT.json

``DIR`` is an mlx-lm model folder (``config.json``, ``*.safetensors``, tokenizer files; llama architecture,
e.g. random bf16 weights from ``bench/random_weights.py``): transformers reads it as ``LlamaForCausalLM`` as
it is (same tensor names; a missing or unexpected tensor fails the run). One optimizer step is our GRPO step
at issue 17's shape: ``--prompts`` (16) prompts x ``--num-generations`` (8) completions of at most
``--max-new-tokens`` tokens, generated in ONE ``generate`` call of TRL's (HF transformers' ``generate``, no
vLLM), scored by our reward, then one optimizer update from ``--micro-batch``-sized forward/backward passes.

- prompts: the first ``--prompts`` of our built-in task's prompt set (``actors.builtin_tasks.TASKS``), as one
  user turn (conversational dataset: TRL applies the tokenizer's chat template, as our actors do);
- reward: ``bench.learning_rewards.<task>`` (weight 1), through TRL's ``f(prompts, completions, **kwargs)``;
- LoRA r16, alpha 32 on every linear layer (peft ``target_modules="all-linear"``); base weights bf16 on a GPU
  with Trainer's bf16 autocast, float32 on the CPU;
- plain sampling (temperature 1, top_p 1, top_k 0); ``beta`` TRL's default (0: no reference model, no KL)
  unless ``--beta``; TRL's defaults elsewhere (loss type, clipping, gradient checkpointing: all recorded).

Measured: each optimizer step's wall-clock, ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``
(``torch.cuda.synchronize`` first on a GPU), split into generation (TRL's ``_generate_single_turn``) and the
rest, and the tokens generated (the completions as TRL keeps them: up to and including the first EOS). The
first ``--warmup`` steps are left out of the medians. ``--output`` gets one JSON object (every step, medians,
settings, TRL's effective config, versions, device, model shape, ``caveats``); stdout's last line sums it up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.peer_trl")
TASK_NAMES = ("arithmetic", "format", "length")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy", "pyarrow")
FIXED: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_iterations": 1, "use_vllm": False, "fp16": False,
    "logging_steps": 1, "report_to": [], "save_strategy": "no", "disable_tqdm": True,
    "dataloader_num_workers": 0,
}  # fmt: skip
"""GRPOConfig settings of every run: plain sampling, one pass over each batch, HF generate, no saving."""
CONFIG_FIELDS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
    "steps_per_generation", "num_generations", "max_completion_length", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "beta", "num_iterations", "epsilon", "epsilon_high", "loss_type",
    "scale_rewards", "importance_sampling_level", "mask_truncated_completions", "use_vllm",
    "use_transformers_continuous_batching", "cache_implementation", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "optim", "weight_decay", "max_grad_norm", "gradient_checkpointing", "bf16", "fp16",
    "seed", "shuffle_dataset", "disable_dropout", "cast_lm_head_to_fp32",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="an mlx-lm / HF llama model folder")
    p.add_argument("--output", type=Path, required=True, help="the JSON record")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--task", choices=TASK_NAMES, default="arithmetic")
    p.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward pass")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (default: GRPOConfig's, 0.0)")
    p.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float32"), default="auto", help="auto: bf16 on GPU"
    )
    p.add_argument("--gradient-checkpointing", choices=("default", "on", "off"), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="the size label bench/e2e_step.py's table groups rows by")
    args = p.parse_args(argv)
    total = args.prompts * args.num_generations
    if total % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide prompts x generations = {total}")
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    return args


def task_rows(task: str, count: int) -> list[dict[str, Any]]:
    """Dataset rows: the task's first ``count`` prompts, each as one user turn (TRL's conversational form)."""
    from actors.builtin_tasks import TASKS

    prompts = TASKS[task].prompts[:count]
    if len(prompts) < count:
        raise SystemExit(f"task {task} has {len(prompts)} prompts, fewer than --prompts {count}")
    return [{"prompt": [{"role": "user", "content": text}]} for text in prompts]


def text_of(item: Any) -> str:
    """A prompt or completion as TRL passes it (text, or a conversation): the last message's text."""
    return item if isinstance(item, str) else str(item[-1]["content"])


def make_reward(task: str) -> Callable[..., list[float]]:
    """``bench.learning_rewards.<task>`` in TRL's reward-function signature ``f(prompts, completions, **kw)``.

    TRL passes one prompt (a conversation here) and one completion (``[{"role": "assistant", ...}]``) per
    sample; our reward takes the prompt's text, the completion's text and the prompt's extras (format task).
    """
    from actors.builtin_tasks import TASKS
    from bench import learning_rewards

    scorer = getattr(learning_rewards, task)
    extras = TASKS[task].extras
    keys = sorted({key for fields in extras.values() for key in fields})

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [text_of(p) for p in prompts]
        kwargs = {key: [extras.get(t, {}).get(key) for t in texts] for key in keys}
        return scorer(texts, [text_of(c) for c in completions], **kwargs)

    reward.__name__ = f"mlx_ppo_{task}"
    return reward


def load_model(folder: Path, dtype: Any) -> tuple[Any, list[str]]:
    """The folder's weights as a ``LlamaForCausalLM`` (random ones of its config's shape when it has none).

    mlx-lm's llama tensors carry transformers' names (``model.layers.N.self_attn.q_proj.weight``, no
    ``lm_head`` when embeddings are tied), so no conversion is needed: any missing or unexpected tensor fails.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    notes: list[str] = []
    if not list(folder.glob("*.safetensors")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
        notes.append("the model folder has no weights: random ones of transformers' init (torch seed 0)")
        return model, notes
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(info.get("missing_keys", ())) - tied
    bad = missing | set(info.get("unexpected_keys", ())) | set(info.get("mismatched_keys", ()))
    if bad:
        raise SystemExit(f"{folder}: weights do not match LlamaForCausalLM: {sorted(map(str, bad))[:8]}")
    return model, notes


def model_record(model: Any) -> dict[str, Any]:
    """Shape, parameter counts and dtypes of the (peft-wrapped) model, for the JSON record."""
    c = model.config
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    shape += ("num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "architecture": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
        **{k: getattr(c, k, None) for k in shape},
        "parameters": sum(p.numel() for p in params if not p.requires_grad),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "frozen_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad}),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "attn_implementation": getattr(c, "_attn_implementation", None),
    }


def grpo_config(args: argparse.Namespace, out_dir: str, on_gpu: bool, bf16: bool) -> Any:
    """``GRPOConfig``: one optimizer step = one generation batch of prompts x generations completions."""
    from trl import GRPOConfig

    total = args.prompts * args.num_generations
    extra: dict[str, Any] = {} if args.beta is None else {"beta": args.beta}
    if args.gradient_checkpointing != "default":
        extra["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    return GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=total // args.micro_batch,
        generation_batch_size=total,  # -> steps_per_generation = accumulation steps: one generate per update
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        bf16=bf16,
        use_cpu=not on_gpu,
        seed=args.seed,
        **FIXED,
        **extra,
    )


def synchronizer() -> Callable[[], None]:
    """``torch.cuda.synchronize`` where there is a GPU, else nothing: timers read finished work."""
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def step_timer(sync: Callable[[], None]) -> Any:
    """A ``TrainerCallback`` recording each optimizer step's wall-clock time and TRL's logs for it."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.summary: dict[str, Any] = {}
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            seconds = time.perf_counter() - self._t0
            self.steps.append({"step": state.global_step, "seconds": seconds})
            logger.info("step %d: %.3f s", state.global_step, seconds)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = dict(logs or {})
            if "train_runtime" in logs:
                self.summary = logs
            elif self.steps:
                self.steps[-1]["trl_logs"] = logs

    return StepTimer()


def time_generation(trainer: Any, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Wrap the trainer's ``_generate_single_turn`` (HF ``generate`` and EOS masking) to time each call."""
    calls: list[dict[str, Any]] = []
    inner = trainer._generate_single_turn

    def timed(prompt_ids: Any, *rest: Any, **kwargs: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        completion_ids, logprobs = inner(prompt_ids, *rest, **kwargs)
        sync()
        lengths = [len(c) for c in completion_ids]
        seconds, prompt_tokens = time.perf_counter() - t0, sum(len(p) for p in prompt_ids)
        calls.append({"seconds": seconds, "sequences": len(lengths), "prompt_tokens": prompt_tokens})
        calls[-1].update(completion_tokens=sum(lengths), max_completion_tokens=max(lengths, default=0))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed
    return calls


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_record() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"type": "cpu", "name": platform.machine(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "memory_gb": round(props.total_memory / 1e9, 1),
        "capability": list(torch.cuda.get_device_capability(0)),
        "cuda": torch.version.cuda,
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }


def merge_steps(steps: list[dict[str, Any]], gens: list[dict[str, Any]]) -> None:
    """Attach each generation call to its step (one call per step: ``generation_batch_size`` = the step)."""
    if len(gens) != len(steps):
        logger.warning("%d generate calls for %d steps: not one per step", len(gens), len(steps))
    for step, gen in zip(steps, gens, strict=False):
        step["generate_seconds"] = gen["seconds"]
        step["rest_seconds"] = step["seconds"] - gen["seconds"]
        step.update({k: v for k, v in gen.items() if k != "seconds"})


def medians(steps: list[dict[str, Any]], warmup: int) -> dict[str, float | None]:
    timed = steps[warmup:]

    def med(key: str) -> float | None:
        values = [s[key] for s in timed if key in s]
        return statistics.median(values) if values else None

    keys = ("seconds", "generate_seconds", "rest_seconds", "completion_tokens")
    out = {f"median_{k}": med(k) for k in keys}
    if out["median_seconds"] and out["median_completion_tokens"]:
        out["median_generated_tokens_per_s"] = out["median_completion_tokens"] / out["median_seconds"]
    return out


def plain(value: Any) -> Any:
    """An enum setting (``OptimizerNames.ADAMW_TORCH``) as its value (``adamw_torch``); others as they are."""
    return getattr(value, "value", value)


def reward_note(timed: list[dict[str, Any]]) -> str:
    """What the timed steps' rewards mean for the update (random weights: groups tie, advantages are 0)."""
    logs = [s.get("trl_logs", {}) for s in timed]
    rewards = [log["reward"] for log in logs if log.get("reward") is not None]
    ties = [log["frac_reward_zero_std"] for log in logs if log.get("frac_reward_zero_std") is not None]
    mean = statistics.fmean(rewards) if rewards else float("nan")
    tied = statistics.fmean(ties) if ties else float("nan")
    return (
        f"timed steps: mean reward {mean:.3f}, {tied:.0%} of groups with one reward for all completions "
        "(advantages 0; TRL still runs their forward/backward); with random weights EOS is rare, so "
        "completions mostly run to max_new_tokens: see completion_tokens per step"
    )


def caveats(
    args: argparse.Namespace, config: Any, model: dict[str, Any], timed: list[dict[str, Any]]
) -> list[str]:
    """What a reader comparing this number with ours must know; the values are read from the config used."""
    beta = "0: no reference model, no KL term (TRL's default)" if config.beta == 0 else f"{config.beta}"
    return [
        f"loss_type {config.loss_type!r} (TRL's default is 'dapo'), scale_rewards {config.scale_rewards!r}, "
        f"epsilon {config.epsilon}; beta {beta}",
        "generation is HF transformers' model.generate (TRL's path without vLLM): one static batch of "
        f"{config.generation_batch_size} left-padded sequences with a DynamicCache KV cache, no continuous "
        "batching, no CUDA graphs or torch.compile (TRL sets disable_compile=True); finished rows are "
        "computed until every row has hit EOS or max_new_tokens",
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'} (TRL's default: on); "
        f"micro-batches of {config.per_device_train_batch_size} completions, "
        f"{config.gradient_accumulation_steps} a step",
        "num_iterations=1 with generation aligned to the update: TRL takes the old log-probs from the "
        "training forward itself (no separate no-grad pass)",
        f"base weights {'/'.join(model['frozen_dtypes'])}, LoRA adapters {'/'.join(model['trainable_dtypes'])} "
        f"(peft makes adapters float32 by default); Trainer's bf16 autocast {'on' if config.bf16 else 'off'}",
        reward_note(timed),
        f"the step's prompts: the first {args.prompts} of the {args.task} task, each step all of them "
        "(TRL's RepeatSampler, shuffled); the step time covers tokenization, generation, reward, forward/"
        "backward and the optimizer step, not TRL's logging after on_step_end",
        f"optimizer {plain(config.optim)}, lr {config.learning_rate} with {plain(config.lr_scheduler_type)} "
        f"decay over {config.max_steps} steps, max_grad_norm {config.max_grad_norm}; one process, one device",
        f"the first {args.warmup} step(s) are left out of the medians (CUDA start-up, allocator growth)",
    ]


def build_trainer(args: argparse.Namespace, out_dir: str) -> tuple[Any, Any, list[dict[str, Any]], list[str]]:
    """TRL's trainer on the folder's model with fresh LoRA adapters; its step timer, generation log, notes."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    on_gpu = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32"))
    model, notes = load_model(args.model, dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left", truncation_side="left")
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0)
    lora.target_modules, lora.task_type = "all-linear", "CAUSAL_LM"
    sync = synchronizer()
    timer = step_timer(sync)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[make_reward(args.task)],
        args=grpo_config(args, out_dir, on_gpu, bf16=dtype == torch.bfloat16),
        train_dataset=Dataset.from_list(task_rows(args.task, args.prompts)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    return trainer, timer, time_generation(trainer, sync), notes


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--steps`` optimizer steps; returns the JSON record."""
    with tempfile.TemporaryDirectory(prefix="peer_trl_") as out_dir:
        trainer, timer, gens, notes = build_trainer(args, out_dir)
        model = model_record(trainer.model)
        logger.info("model %s; training %d steps", model, args.steps)
        trainer.train()
    merge_steps(timer.steps, gens)
    config = trainer.args
    return {
        "bench": "peer_trl",
        # what bench/e2e_step.py's table reads: every step's time, the warm-up, tokens generated per step
        "system": "trl",
        "label": args.label,
        "step_s": [s["seconds"] for s in timer.steps],
        "warmup_steps": args.warmup,
        "gen_tokens": [s.get("completion_tokens", 0) for s in timer.steps],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "completions_per_step": args.prompts * args.num_generations,
        **medians(timer.steps, args.warmup),
        "steps": timer.steps,
        "trl_summary": timer.summary,
        "grpo_config": {k: plain(getattr(config, k, None)) for k in CONFIG_FIELDS},
        "model": model,
        "versions": {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}},
        "device": device_record(),
        "command": sys.argv,
        "caveats": notes + caveats(args, config, model, timer.steps[args.warmup :]),
    }


def use_repo_root() -> None:
    """Import from the repository root, not from bench/, which python puts first for a script (its
    ``distributed.py``, ``generation.py``, ... would shadow modules of those names)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    use_repo_root()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    record = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1, default=str))
    keys = ("median_seconds", "median_generate_seconds", "median_rest_seconds", "median_completion_tokens")
    print(json.dumps({"output": str(args.output), **{k: record.get(k) for k in keys}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
