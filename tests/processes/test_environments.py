"""Multi-turn environments trained through ``launch.py``: real learner and actor processes on the tiny model, the
environment chosen by ``run.environment`` (a registry name, a test module's class, the README's example)."""

import json
import os
import re
import subprocess
import sys

from tests.helpers import ROOT, SMALL, metric_rows

EPISODES = ["ppo.algorithm=grpo", "sampling.max_episode_tokens=64", "transport.heartbeat_s=0.05"]
"""GRPO over groups of 2 episodes, room for a few 8-token turns, heartbeats often enough that the counters of
the batches trained reach the metrics rows."""


def launch(model_cache, run_dir, *settings, updates=2, pythonpath=()) -> subprocess.CompletedProcess:
    """``launch.py`` with one actor on the tiny model, the small settings, ``EPISODES`` and ``settings``."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--actors", "1", "--model", "tiny"]
    cmd += ["--max-updates", str(updates), "--run-dir", str(run_dir)]
    for item in [*SMALL, *EPISODES, f'model.cache_dir="{model_cache}"', *settings]:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def counter(rows: list[dict], name: str) -> float:
    """The largest value actor 0 reported for ``name`` (a cumulative counter) in any row."""
    return max((r.get(f"actor/0/{name}", 0.0) for r in rows), default=0.0)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return json.dumps(str(path))


def test_a_guess_number_run_trains_on_whole_episodes(model_cache, tmp_path):
    """The registry's game with its own records: updates complete on multi-turn episodes whose responses are
    longer than one turn's max_new_tokens (the learner accepts the episode budget: none rejected too long)."""
    run_dir = tmp_path / "run"
    out = launch(model_cache, run_dir, 'run.environment="guess_number"')
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metric_rows(run_dir)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert "environment guess_number: 400 records from its records()" in out.stderr
    assert all(r.get("reject/too_long", 0) == 0 and r.get("reject/bad_lengths", 0) == 0 for r in rows)
    assert max(r["rollout/response_len_mean"] for r in rows) > 8  # model tokens of several 8-token turns
    assert counter(rows, "episodes") >= 8 and counter(rows, "turns_per_episode") > 1
    assert counter(rows, "turn_limit_ends") + counter(rows, "context_ends") > 0
    assert counter(rows, "env_errors") == 0 and counter(rows, "env_timeouts") == 0


def test_a_failing_hanging_or_flooding_environment_is_counted_and_the_run_goes_on(model_cache, tmp_path):
    """A module:Class environment from a test module, its records from the prompt file: episodes whose
    environment raises or hangs past the step timeout score NaN, their groups are dropped (reject/bad_score) and
    counted by the actor; a flood is cut; the run completes its updates on the other episodes."""
    kinds = ["ok", "ok", "ok", "flood", "raise", "hang"]
    prompts = write_jsonl(
        tmp_path / "kinds.jsonl", [{"prompt": f"case {i}", "kind": k} for i, k in enumerate(kinds)]
    )
    settings = [
        'run.environment="tests.env_samples:Unruly"',
        f"run.prompts={prompts}",
        "run.env_step_timeout_s=0.5",
    ]
    out = launch(model_cache, tmp_path / "run", *settings, updates=3)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metric_rows(tmp_path / "run")
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert counter(rows, "env_errors") >= 2 and counter(rows, "env_timeouts") >= 2  # both episodes of a group
    assert counter(rows, "observation_cuts") >= 2
    assert rows[-1]["reject/bad_score"] >= 4 and rows[-1]["reject/bad_score"] % 2 == 0  # whole groups
    assert "Unruly.step took longer than 0.5 s" in out.stderr and "the tool crashed" in out.stderr


def readme_environment() -> str:
    """The environment class of the README's 'Multi-turn environments' section, as it stands there."""
    section = (ROOT / "README.md").read_text().split("## Multi-turn environments", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_environment_example_trains(model_cache, tmp_path):
    """The README's example, saved as the module it tells users to write, runs as a module:Class environment
    with its records from a prompt file."""
    (tmp_path / "my_envs.py").write_text(readme_environment())
    words = [{"prompt": f"spell {w}", "word": w} for w in ("cat", "tree", "moon", "sun")]
    settings = [
        'run.environment="my_envs:Spelling"',
        f"run.prompts={write_jsonl(tmp_path / 'w.jsonl', words)}",
    ]
    out = launch(model_cache, tmp_path / "run", *settings, pythonpath=[tmp_path])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metric_rows(tmp_path / "run")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert counter(rows, "episodes") >= 8 and counter(rows, "env_errors") == 0


def test_settings_an_environment_run_cannot_work_with_are_listed_before_anything_starts(
    model_cache, tmp_path
):
    """Every config problem at once (a bad name, a budget without room for a turn, a reward that would be
    ignored, a zero timeout); then, past the config, an environment that does not load or has no records."""
    out = launch(
        model_cache,
        tmp_path / "a",
        'run.environment="not a name"',
        "sampling.max_episode_tokens=8",
        'run.reward="tests.helpers:failing_reward"',
        "run.env_step_timeout_s=0",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    for message in (
        "run.environment='not a name': use a registry name",
        "sampling.max_episode_tokens=8 must exceed sampling.max_new_tokens=8",
        "run.reward='tests.helpers:failing_reward' is not used with run.environment",
        "run.env_step_timeout_s=0.0 must be > 0",
    ):
        assert message in out.stderr, out.stderr[-3000:]
    for setting, message in (
        ('run.environment="guess_numbers"', "not a registry name (calculator, guess_number, python)"),
        ('run.environment="tests.env_samples:Nope"', "tests.env_samples:Nope' not found"),
        ('run.environment="tests.env_samples:Unruly"', "has no records of its own"),
    ):
        out = launch(model_cache, tmp_path / "b", setting)
        assert out.returncode == 2 and message in out.stderr, (setting, out.stderr[-3000:])
        assert "actor 0 joined" not in out.stderr


def test_the_example_configs_are_valid_environment_runs():
    from common.config import load_config, max_response_tokens

    for name, environment in (
        ("guess_number", "guess_number"),
        ("calculator", "calculator"),
        ("python_tool", "python"),
    ):
        cfg = load_config(ROOT / "examples" / "configs" / f"{name}.toml")
        assert cfg.run.environment == environment and not cfg.run.reward
        assert (
            cfg.sampling.batch_size == 8 and max_response_tokens(cfg) == cfg.sampling.max_episode_tokens - 1
        )


def test_the_tool_environments_train_with_ppo_and_grpo(model_cache, tmp_path):
    """The calculator with PPO and its critic (per-turn rewards on the wire, values at model tokens) and the
    Python tool with GRPO (snippets in the sandbox) complete their updates through separate processes; no batch
    is refused for its per-token arrays."""
    for env, algorithm in (("calculator", "ppo"), ("python", "grpo")):
        run_dir = tmp_path / env
        # their instructions take ~380 of the tiny model's byte-level tokens (~130 of the bundled model's)
        settings = (
            f'run.environment="{env}"',
            f"ppo.algorithm={algorithm}",
            "sampling.max_prompt_tokens=512",
        )
        out = launch(model_cache, run_dir, *settings)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = metric_rows(run_dir)
        assert [r["policy_version"] for r in rows] == [1, 2], env
        bad = ("reject/bad_rewards", "reject/bad_lengths", "reject/bad_dtype", "reject/too_long")
        assert all(r.get(k, 0) == 0 for r in rows for k in bad), env
        assert counter(rows, "episodes") >= 4 and counter(rows, "env_errors") == 0, env
