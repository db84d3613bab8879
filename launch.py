"""Entry point: ``python launch.py [--config FILE.toml] [--model NAME] [--set section.key=value ...]``.

Today it runs the foundation end to end on one process: load the model (the bundled SmolLM2-135M-Instruct by
default), attach LoRA adapters, sample a batch of completions with their behaviour log-probs, and report
throughput. The actor/learner runtime will be started from here as it lands.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.blas import reexec_with_fast_blas

logger = logging.getLogger("launch")

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colours.",
    "What is 12 + 30?",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="TOML file with settings (sections: model, lora, sampling, run)")
    parser.add_argument("--model", help="default | tiny | a local mlx-lm folder | a Hugging Face id")
    parser.add_argument("--run-dir", help="where the resolved config and outputs go (run.run_dir)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set sampling.temperature=0.7 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    reexec_with_fast_blas()
    from common.config import ConfigError, config_to_toml, load_config
    from common.logs import setup_logging

    setup_logging("launcher")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model!r}".replace("'", '"'))
    if args.run_dir:
        overrides.append(f'run.run_dir="{args.run_dir}"')
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg))
    return run_sampling_demo(cfg)


def run_sampling_demo(cfg) -> int:
    from actors.sampler import SamplingParams, generate_completions
    from common.lora import attach_lora
    from common.models import ModelLoadError, load_model

    try:
        loaded = load_model(cfg.model)
    except ModelLoadError as e:
        logger.error("%s", e)
        return 2
    attach_lora(loaded.model, cfg.lora)
    tok = loaded.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in DEMO_PROMPTS
    ]
    start = time.perf_counter()
    completions = generate_completions(
        loaded.model,
        prompts,
        SamplingParams.from_config(cfg.sampling),
        set(tok.eos_token_ids),
        seeds=[cfg.sampling.seed * 1_000_003 + i for i in range(len(prompts))],
    )
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(c.response_ids) for c in completions)
    for question, c in zip(DEMO_PROMPTS, completions, strict=True):
        logger.info(
            "%s -> %r (%s, mean logprob %.3f)",
            question,
            tok.decode(c.response_ids),
            c.finish_reason,
            float(c.logprobs.mean()),
        )
    logger.info("sampled %d tokens in %.2fs (%.1f tok/s)", n_tokens, elapsed, n_tokens / elapsed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
