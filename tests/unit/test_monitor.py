"""Monitoring: the live view's frame, its file reading, the PNG charts, the log line's progress, extra sinks.

All on real files in a temporary run directory; nothing is mocked.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from learner.metrics import MetricsWriter, format_duration, format_update_line
from tools.metrics_file import MetricsTail
from tools.monitor import SPARK, elapsed_s, render_frame, run_monitor, sparkline
from tools.plot import run_plot, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {
    "model": {"name": "tiny"},
    "run": {"run_dir": "/runs/a", "task": "letters", "max_updates": 10},
    "ppo": {"algorithm": "grpo"},
}
CONFIG_TOML = (
    '[model]\nname = "tiny"\n\n[ppo]\nalgorithm = "grpo"\n\n[run]\ntask = "letters"\nmax_updates = 5\n'
)


def make_row(step: int, **extra: object) -> dict[str, object]:
    """A metrics row like the learner's, with round numbers the assertions can name."""
    row = {
        "step": step,
        "policy_version": step,
        "time_s": 10.0 * step,
        "perf/samples_per_s": 1.5,
        "perf/gen_tokens_per_s": 200.0,
        "perf/train_tokens_per_s": 90.0,
        "perf/learner_busy_frac": 0.85,
        "actor/0/gen_tokens_per_s": 120.0,
        "actor/1/gen_tokens_per_s": 80.0,
        "actor/10/gen_tokens_per_s": 0.0,
        "actors/connected": 3,
        "lag/mean": 0.5,
        "lag/max": 1,
        "lag/dropped": 4,
        "buffer/depth": 2,
        "rollout/in_flight": 8,
        "sync/ms": 12.4,
        "sync/bytes": 2_500_000,
        "rollout/score_mean": 0.25 * step,
        "rollout/score_std": 0.1,
        "kl/ref_mean": 0.0123,
        "kl/coef": 0.05,
        "policy/approx_kl": 0.0004,
        "loss/policy": -0.0321,
        "loss/value": 0.5,
        "policy/entropy": 2.125,
        "reject/bad_score": 2,
        "reject/curve_denied": 0,
    }
    row.update(extra)
    return row


def write_run(run_dir: Path, steps: int, partial: str = "") -> None:
    """A run directory as the launcher and learner leave it, the last line optionally cut mid-write."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(CONFIG_TOML)
    writer = MetricsWriter(run_dir)
    for step in range(1, steps + 1):
        writer.write(make_row(step))
    writer.close()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(partial)


# -- the frame -------------------------------------------------------------------------------------------------


def test_render_frame_shows_the_latest_numbers():
    frame = render_frame([make_row(1), make_row(2), make_row(3)], CONFIG, age_s=5.0, source="/copy/a")
    lines = frame.splitlines()
    assert lines[0] == "run /copy/a | model tiny | task letters | grpo"
    assert "update 3/10 v3 | elapsed 30s | ETA 1m10s" in frame  # 10 s per update, 7 to go
    assert "alive: last update 5s ago (one every ~10s)" in frame
    assert "1.50 samples/s | train 90 tok/s | learner busy 85%" in frame
    assert "200 tok/s from 3 actors (3 connected)" in frame
    assert "actor 0: 120 | actor 1: 80 | actor 10: 0" in frame  # numeric id order
    assert "mean 0.50 max 1 | dropped 4 | buffer 2 | in flight 8" in frame
    assert "12 ms (2.5 MB)" in frame
    assert "score        0.750 ± 0.100  ▁▅█  (last 3: 0.250 to 0.750)" in frame
    assert "0.0123 (coef 0.05) | approx_kl 0.0004" in frame
    assert "policy -0.0321 | value 0.5000 | entropy 2.125" in frame
    assert lines[-1] == "rejects      bad_score 2"  # zero counters are left out


def test_render_frame_judges_liveness_and_the_end():
    rows = [make_row(1), make_row(2)]
    assert "SILENT: no update for 1m40s (one every ~10s)" in render_frame(rows, CONFIG, age_s=100.0)
    finished = render_frame([make_row(9), make_row(10)], CONFIG, age_s=1000.0)
    assert "status       finished" in finished and "ETA" not in finished
    assert "waiting for the first update" in render_frame([], {})


def test_render_frame_tolerates_missing_and_null_values():
    row = {"step": 1, "rollout/score_mean": None, "loss/value": None}  # e.g. GRPO, a non-finite score
    frame = render_frame([row], {}, age_s=None)
    assert "update 1 v? |" in frame and "status       ?" in frame
    assert "score        - ± -" in frame and "value -" in frame and "rejects      none" in frame


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == SPARK
    assert sparkline([3.0, None, 3.0]) == "▁ ▁"
    assert sparkline([None]) == ""
    assert len(sparkline(list(range(100)), width=40)) == 40


def test_elapsed_adds_the_segments_of_a_resumed_run():
    rows = [{"time_s": 10.0}, {"time_s": 20.0}, {"time_s": 5.0}, {"time_s": 15.0}]
    assert elapsed_s(rows) == 35.0
    assert format_duration(59.6) == "1m00s" and format_duration(3 * 3600 + 300) == "3h05m"


# -- reading the files ---------------------------------------------------------------------------------------


def test_tail_reads_only_whole_lines_and_rereads_a_replaced_file(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # not there yet: the run is starting
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "ti')
    assert [r["step"] for r in tail.read()] == [1]
    with path.open("a") as f:
        f.write('me_s": 3.0}\n')
    assert [r["step"] for r in tail.read()] == [1, 2]
    replacement = tmp_path / "new.jsonl"  # a resumed learner drops the rows of lost updates
    replacement.write_text(json.dumps({"step": 1}) + "\n")
    replacement.replace(path)
    assert [r["step"] for r in tail.read()] == [1]


def test_run_monitor_once_skips_a_partial_last_line(tmp_path: Path):
    write_run(tmp_path / "run", steps=2, partial='{"step": 3, "perf/samp')
    out = io.StringIO()
    assert run_monitor(tmp_path / "run", once=True, out=out) == 0
    frame = out.getvalue()
    assert "update 2/5 v2" in frame and "model tiny | task letters | grpo" in frame
    assert "\x1b[" not in frame  # not a terminal: plain text


def test_run_monitor_redraws_in_place_on_a_terminal(tmp_path: Path):
    write_run(tmp_path / "run", steps=2)
    controller, terminal = os.openpty()
    with os.fdopen(terminal, "w", encoding="utf-8") as out:
        assert run_monitor(tmp_path / "run", once=True, out=out) == 0
    shown = os.read(controller, 65536).decode("utf-8")
    os.close(controller)
    assert shown.startswith("\x1b[H") and shown.endswith("\x1b[J")  # home, overwrite, clear the rest
    assert "update 2/5 v2 | elapsed 20s | ETA 30s\x1b[K" in shown and "task letters | grpo\x1b[K" in shown


def test_run_monitor_waits_for_metrics_and_ends_with_the_run(tmp_path: Path):
    (tmp_path / "starting").mkdir()
    out = io.StringIO()
    assert run_monitor(tmp_path / "starting", once=True, out=out) == 0
    assert "waiting for the first update" in out.getvalue()
    write_run(tmp_path / "done", steps=5)
    out = io.StringIO()
    assert run_monitor(tmp_path / "done", refresh_s=60.0, out=out) == 0  # finished: returns, no refresh
    assert "status       finished" in out.getvalue()


def test_run_monitor_refuses_a_missing_run_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert run_monitor(tmp_path / "nope", once=True, out=io.StringIO()) == 2
    assert f"no run directory {tmp_path / 'nope'}" in caplog.text


# -- charts ----------------------------------------------------------------------------------------------------


def test_write_plots_writes_png_charts(tmp_path: Path):
    write_run(tmp_path / "run", steps=4, partial='{"step": 5')
    paths = write_plots(tmp_path / "run")
    assert [p.name for p in paths] == [
        "score.png",
        "kl.png",
        "loss.png",
        "throughput.png",
        "lag.png",
        "sync.png",
    ]
    for path in paths:
        assert path.parent == tmp_path / "run" / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_write_plots_leaves_out_charts_without_data_and_explains_failures(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "sync/ms": 3.0}) + "\n")
    assert [p.name for p in write_plots(run, tmp_path / "out")] == ["sync.png"]
    (run / "metrics.jsonl").write_text('{"step": 1')
    with pytest.raises(ValueError, match="no complete update row"):
        write_plots(run)
    with pytest.raises(FileNotFoundError, match="no run directory"):
        write_plots(tmp_path / "nope")
    assert run_plot(tmp_path / "nope") == 2


# -- the learner's log line ----------------------------------------------------------------------------------


def test_format_update_line_shows_progress_and_eta():
    m = make_row(3, time_s=30.0)
    assert format_update_line(m).startswith("update 3 v3 | 1.50 samples/s")
    line = format_update_line(m, max_updates=20)
    assert line.startswith("update 3/20 v3 | ") and line.endswith("| sync 12 ms | ETA 2m50s")
    assert format_update_line(m, max_updates=20, resumed_step=1).endswith("ETA 4m15s")  # 15 s per own update
    assert format_update_line(m, max_updates=20, resumed_step=3).endswith("ETA ?")


# -- extra sinks ---------------------------------------------------------------------------------------------


def test_unknown_sink_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown metrics sinks \\['csv'\\]"):
        MetricsWriter(tmp_path, sinks=("csv",))


@pytest.mark.parametrize(
    ("sink", "modules", "advice"),
    [
        ("wandb", ("wandb",), "pip install wandb"),
        ("tensorboard", ("tensorboardX", "torch"), "pip install tensorboardX"),
    ],
)
def test_a_sink_without_its_package_says_what_to_install(tmp_path: Path, sink, modules, advice):
    if any(importlib.util.find_spec(m) is not None for m in modules):
        pytest.skip(f"{sink}'s package is installed here")
    with pytest.raises(ImportError, match=advice):
        MetricsWriter(tmp_path, sinks=(sink,))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused at start-up, before any row


def _events(logdir: Path) -> list:
    """Every event in the TFRecord event files (each record: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (size,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + size]))
            i += 12 + size + 4
    return events


def _event_scalars(logdir: Path) -> list[tuple[int, str, float]]:
    return [(e.step, v.tag, v.simple_value) for e in _events(logdir) for v in e.summary.value]


def _session_logs(logdir: Path) -> list[tuple[int, int]]:
    return [(e.step, e.session_log.status) for e in _events(logdir) if e.HasField("session_log")]


def test_tensorboard_sink_writes_event_files(tmp_path: Path):
    pytest.importorskip("tensorboardX")
    writer = MetricsWriter(tmp_path, sinks=("tensorboard",))
    writer.write({"step": 1, "loss/policy": 0.5, "rollout/score_mean": float("nan"), "note": "x"})
    writer.write({"step": 2, "loss/policy": 0.25, "actors/connected": 2})
    writer.close()
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert sorted(scalars) == [
        (1, "loss/policy", 0.5),
        (2, "actors/connected", 2.0),
        (2, "loss/policy", 0.25),
    ]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["rollout/score_mean"] is None


def test_tensorboard_sink_purges_updates_a_resumed_run_redoes(tmp_path: Path):
    tensorboardX = pytest.importorskip("tensorboardX")
    writer = MetricsWriter(tmp_path, sinks=("tensorboard",))
    for step in (1, 2, 3):
        writer.write({"step": step, "loss/policy": float(step)})
    writer.close()
    resumed = MetricsWriter(tmp_path, sinks=("tensorboard",))
    resumed.drop_after(1)
    resumed.write({"step": 2, "loss/policy": 20.0})
    resumed.close()
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    start = tensorboardX.proto.event_pb2.SessionLog.START
    purges = [step for step, status in _session_logs(tmp_path / "tensorboard") if status == start]
    assert 2 in purges  # TensorBoard hides the old run's points from step 2 on


def test_a_torn_last_row_neither_breaks_a_resume_nor_glues_onto_the_next(tmp_path: Path):
    """Attack table row 10 (issue 15): a full disk cut the last row; every --resume then failed to parse it."""
    writer = MetricsWriter(tmp_path)
    for step in (1, 2):
        writer.write({"step": step, "loss/policy": float(step)})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss/pol')  # the disk filled up here
    resumed = MetricsWriter(tmp_path)
    resumed.drop_after(2)
    resumed.write({"step": 3, "loss/policy": 3.0})
    resumed.close()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss/policy"] == 3.0
