"""bench/learning_curves.py on synthetic reward logs: trailing-window curves, seed bands, time to the peer's final
reward, and the rendered table; bench/learning.py's settings for each system."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.learning import SYSTEMS, Run, overrides
from bench.learning_curves import curve, first_reaching, render_learning, summarise
from common.config import load_config


def write_run(folder: Path, system: str, seed: int, points: list[tuple[float, list[float]]]) -> None:
    t0 = 1000.0
    name = f"length-{system}-s{seed}"
    (folder / f"{name}.rewards.jsonl").write_text(
        "".join(json.dumps({"t": t0 + t, "pid": 1, "scores": s}) + "\n" for t, s in points)
    )
    record = {"system": system, "task": "length", "seed": seed, "budget_s": 40.0, "t0": t0, "updates": 3}
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_a_trailing_window_curve_by_hand():
    times, scores = np.array([1.0, 5.0, 12.0, 25.0]), np.array([0.0, 1.0, 1.0, 0.5])
    got = curve(times, scores, np.array([0.5, 10.0, 20.0, 30.0]), window_s=10.0)
    assert np.isnan(got[0]) and got[1:].tolist() == [0.5, 1.0, 0.5]
    assert first_reaching(np.array([10.0, 20.0, 30.0]), np.array([np.nan, 0.2, 0.6]), 0.5) == 30.0
    assert first_reaching(np.array([10.0]), np.array([0.1]), 0.5) is None


def test_seeds_bands_and_the_time_to_the_peers_final_reward(tmp_path):
    write_run(tmp_path, "ours", 0, [(5, [0.2]), (15, [0.6]), (25, [0.8]), (35, [0.8])])
    write_run(tmp_path, "ours", 1, [(5, [0.4]), (15, [0.4]), (25, [0.6]), (35, [0.9, float("nan")])])
    write_run(tmp_path, "mlx-lm-lora", 0, [(8, [0.2]), (30, [0.7]), (38, [0.2])])
    (tmp_path / "summary.json").write_text("{}")  # a summary beside the runs is no run
    summary = summarise(tmp_path)
    entry = summary["tasks"]["length"]
    assert entry["grid_s"] == [10.0, 20.0, 30.0, 40.0]
    ours = entry["systems"]["ours"]
    assert ours["seeds"] == [0, 1] and ours["samples_per_seed"] == [4, 4]  # the NaN score is left out
    assert ours["final_per_seed"] == pytest.approx(
        [np.mean([0.2, 0.6, 0.8, 0.8]), np.mean([0.4, 0.4, 0.6, 0.9])]
    )
    assert ours["curve_lo"][0] == 0.2 and ours["curve_hi"][0] == 0.4
    assert entry["peer_final"] == pytest.approx(1.1 / 3)  # mean of 0.2, 0.7, 0.2 in the last 60 s
    assert entry["time_to_peer_final_s"]["ours"] == 20.0  # seed mean (0.4 + 0.4) / 2 at 20 s
    assert entry["peer_best"] == pytest.approx(0.45)  # its curve: 0.2, 0.2, 0.45, 0.367
    assert entry["time_to_peer_best_s"] == {"ours": 30.0, "mlx-lm-lora": 30.0}
    table = "\n".join(render_learning(summary))
    assert "| ours | 2 |" in table and "20 s (0.50 of the budget)" in table


@pytest.mark.parametrize("system", [*SYSTEMS, "legacy"])
def test_every_benchmark_configuration_is_a_valid_config(system):
    items = overrides(Run(system, "format", 0), lr=None)
    if system == "legacy":  # run by the code before issue 14, whose config had no such checks
        return
    cfg = load_config(None, items)
    assert cfg.run.reward == "bench.learning_rewards:format" and cfg.sampling.max_new_tokens == 48
