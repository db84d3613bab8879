import numpy as np
import pytest

from common import protocol
from common.config import ConfigError, load_config
from learner.buffer import ExperienceBuffer


def batch(version=0, scores=(1.0, 2.0, 3.0, 4.0), logprob=-0.5, actor_id=0):
    seqs = tuple(protocol.Sequence_(2, 3, s, "stop", i // 2) for i, s in enumerate(scores))
    n = len(scores)
    tokens = np.arange(5 * n, dtype=np.int32)
    logprobs = np.full(3 * n, logprob, np.float32)
    return protocol.ExperienceBatch(actor_id, 0, version, seqs, tokens, logprobs)


def test_groups_round_trip_into_an_experience():
    buf = ExperienceBuffer(capacity=16, group_size=2, max_policy_lag=1)
    assert buf.add(batch(), current_version=0) == 4 and buf.depth == 4
    exp, lags = buf.take(4, current_version=0)
    assert exp.prompt(1).tolist() == [5, 6] and exp.response(1).tolist() == [7, 8, 9]
    assert exp.scores.tolist() == [1, 2, 3, 4] and lags.tolist() == [0, 0, 0, 0]
    assert buf.depth == 0 and buf.take(2, 0) is None


def test_staleness_drops_exactly_beyond_max_policy_lag():
    buf = ExperienceBuffer(capacity=64, group_size=2, max_policy_lag=2)
    assert buf.add(batch(version=3), current_version=5) == 4  # lag 2: kept
    assert buf.add(batch(version=2), current_version=5) == 0  # lag 3: dropped on arrival
    assert buf.counters["lag/dropped"] == 4
    assert buf.take(4, current_version=6) is None  # the kept ones went stale while buffered
    assert buf.counters["lag/dropped"] == 8 and buf.depth == 0


@pytest.mark.parametrize(
    "scores,logprob,reason",
    [
        ((1.0, float("nan"), 3.0, 4.0), -0.5, "reject/bad_score"),
        ((1.0, 2.0, float("inf"), 4.0), -0.5, "reject/bad_score"),
        ((1.0, 2.0, 3.0, 4.0), float("nan"), "reject/bad_logprobs"),
        ((1.0, 2.0, 3.0, 4.0), 0.5, "reject/bad_logprobs"),
    ],
)
def test_bad_values_drop_their_whole_group(scores, logprob, reason):
    buf = ExperienceBuffer(capacity=64, group_size=2, max_policy_lag=2)
    accepted = buf.add(batch(scores=scores, logprob=logprob), current_version=0)
    assert buf.counters[reason] == (4 if np.isnan(logprob) or logprob > 0 else 2)
    assert accepted == 4 - buf.counters[reason]
    if accepted:
        exp, _ = buf.take(accepted, 0)
        assert np.isfinite(exp.scores).all()


def test_batches_that_do_not_split_into_groups_are_refused():
    buf = ExperienceBuffer(capacity=64, group_size=4, max_policy_lag=2)
    assert buf.add(batch(scores=(1.0, 2.0)), current_version=0) == 0
    assert buf.counters["reject/bad_group"] == 2


def test_ppo_settings_are_validated_together():
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["ppo.batch_size=30", "ppo.group_size=4", "ppo.algorithm=grpo", "ppo.kl_estimator=k2"]
        )
    text = str(err.value)
    assert "multiple of ppo.group_size" in text and "kl_estimator" in text
    with pytest.raises(ConfigError, match="needs >= 2"):
        load_config(
            None, ["ppo.algorithm=rloo", "ppo.group_size=1", "ppo.batch_size=8", "sampling.batch_size=8"]
        )
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(None, ["ppo.batch_size=32", "ppo.num_minibatches=2", "ppo.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config(None, ["sampling.top_k=5"])
