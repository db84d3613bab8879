"""The learner learns: generate -> score -> update in one process on the tiny model, and the score must rise."""

import mlx.core as mx
import numpy as np
import pytest

from actors.sampler import SamplingParams, generate_completions
from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
from common.models import load_model
from learner.experience import Experience
from learner.models import build_policy_and_value
from learner.ppo_learner import PPOLearner

PROMPTS = 8
NEW_TOKENS = 8


def share_of_tokens(targets: set[int]):
    """Toy reward: the share of response tokens in ``targets``."""
    return lambda response: float(np.mean([t in targets for t in response]))


def run_training(model_cache, algorithm: str, updates: int, seed: int = 0) -> list[float]:
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    mx.random.seed(seed)
    cfg = PPOUpdateConfig(
        algorithm=algorithm,
        group_size=4,
        batch_size=PROMPTS * 4,
        num_minibatches=2,
        micro_batch_size=16,
        update_epochs=2,
        learning_rate=3e-3,
        kl_coef=0.01,
        vf_coef=0.5,
    )
    container = build_policy_and_value(
        loaded.model, LoraConfig(rank=8, alpha=16.0), value_kind=None if cfg.is_critic_free else "separate"
    )
    learner = PPOLearner(container, cfg, temperature=1.0)
    tok = loaded.tokenizer
    # Lowercase letters: ~10% of the tiny byte vocabulary, so the first batches already carry signal.
    reward = share_of_tokens({tok.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz"})
    prompts = [[1] + tok.encode(f"say a {i}") for i in range(PROMPTS) for _ in range(cfg.group_size)]
    means = []
    for step in range(updates):
        seeds = [step * 1000 + i for i in range(len(prompts))]
        completions = generate_completions(
            container.policy, prompts, SamplingParams(max_new_tokens=NEW_TOKENS), set(), seeds
        )
        scores = np.array([reward(c.response_ids) for c in completions], np.float32)
        means.append(float(scores.mean()))
        learner.update(
            Experience.from_rows(
                [c.prompt_ids for c in completions],
                [c.response_ids for c in completions],
                [c.logprobs for c in completions],
                scores,
                np.full(len(scores), learner.policy_version),
            )
        )
    return means


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_score_rises(model_cache, algorithm):
    means = run_training(model_cache, algorithm, updates=14)
    start, end = np.mean(means[:2]), np.mean(means[-2:])
    print(algorithm, [round(m, 3) for m in means])
    assert end > start + 0.2, means
