"""CURVE: keys made by the launcher, required off loopback, and peers without the right key kept out."""

import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actors.actor import ActorWorker
from actors.tasks import get_task
from common.config import ConfigError, load_config
from common.lora import attach_lora
from common.models import load_model
from common.transport import (
    ActorSockets,
    CurveKeys,
    Endpoints,
    LearnerSockets,
    free_tcp_ports,
    make_keys,
    zmq_context,
)
from learner.process import build_learner
from learner.service import LearnerService
from tests.helpers import small_config

ROOT = Path(__file__).resolve().parents[2]


def test_launch_keys_writes_key_pairs_with_private_secrets(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "keys", str(tmp_path / "keys")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == ["actor.key", "actor.key_secret", "learner.key", "learner.key_secret"]
    for secret in ("actor.key_secret", "learner.key_secret"):
        assert stat.S_IMODE((tmp_path / "keys" / secret).stat().st_mode) == 0o600
    keys = CurveKeys.load(tmp_path / "keys", "actor")
    assert keys.learner_public == CurveKeys.load(tmp_path / "keys", "learner").public


def test_binding_beyond_loopback_needs_keys(tmp_path):
    with pytest.raises(ConfigError, match="CURVE keys"):
        load_config(None, ['transport.host="0.0.0.0"'])
    load_config(None, ['transport.host="0.0.0.0"', f'transport.keys_dir="{tmp_path}"'])
    load_config(None, ['transport.host="127.0.0.2"'])  # loopback: keys optional


def test_missing_keys_say_how_to_make_them(tmp_path):
    with pytest.raises(ValueError, match="launch.py keys"):
        CurveKeys.load(tmp_path / "nowhere", "actor")


def _actor(cfg, ctx, endpoints, keys):
    loaded = load_model(cfg.model)
    attach_lora(loaded.model, cfg.lora)
    sockets = ActorSockets(ctx, endpoints, cfg.transport.experience_hwm, keys)
    worker = ActorWorker(cfg, 0, 1, sockets, loaded.model, loaded.tokenizer, get_task(cfg.run.task))
    return worker, sockets


def _joins(service, worker, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        service.poll(10)
        if worker.poll_connect(10):
            return True
    return False


def test_only_actors_with_a_run_key_can_join(model_cache, tmp_path):
    make_keys(tmp_path / "keys")
    make_keys(tmp_path / "other")
    # An outsider who knows the learner's public key but holds a key pair of its own.
    shutil.copy(tmp_path / "keys" / "learner.key", tmp_path / "other" / "learner.key")
    cfg = small_config(model_cache, tmp_path / "run", f'transport.keys_dir="{tmp_path / "keys"}"')
    endpoints = Endpoints.tcp("127.0.0.1", free_tcp_ports())
    with zmq_context() as ctx:
        learner_sockets = LearnerSockets(ctx, endpoints, 2, CurveKeys.load(tmp_path / "keys", "learner"))
        opened = [learner_sockets]
        try:
            service = LearnerService(cfg, learner_sockets, build_learner(cfg), tmp_path / "run")
            service.publish_weights()
            outsider, sockets = _actor(cfg, ctx, endpoints, CurveKeys.load(tmp_path / "other", "actor"))
            opened.append(sockets)
            assert not _joins(service, outsider, seconds=3)
            assert learner_sockets.denied_peers >= 1
            plain, sockets = _actor(cfg, ctx, endpoints, None)  # no CURVE at all: the handshake fails
            opened.append(sockets)
            assert not _joins(service, plain, seconds=2)
            member, sockets = _actor(cfg, ctx, endpoints, CurveKeys.load(tmp_path / "keys", "actor"))
            opened.append(sockets)
            assert _joins(service, member, seconds=30)
            assert service.actors and all(a.actor_id == 0 for a in service.actors.values())
        finally:
            for s in opened:
                s.close()


def test_a_learner_bound_beyond_loopback_without_keys_refuses_to_start(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "learner",
            "--bind",
            "tcp://0.0.0.0:5555",
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "needs ZeroMQ CURVE keys" in out.stderr, out.stderr[-2000:]


def test_base_addresses_name_three_consecutive_ports():
    endpoints = Endpoints.from_base("tcp://10.0.0.5:5555")
    assert endpoints.as_dict() == {
        "experience": "tcp://10.0.0.5:5555",
        "weights": "tcp://10.0.0.5:5556",
        "control": "tcp://10.0.0.5:5557",
    }
    for bad in ("10.0.0.5:5555", "tcp://10.0.0.5", "tcp://:5555", "udp://h:1", "tcp://h:65535"):
        with pytest.raises(ValueError, match="tcp://HOST:PORT"):
            Endpoints.from_base(bad)


def test_a_local_run_with_local_auth_keeps_local_processes_without_its_key_out(model_cache, tmp_path):
    """Loopback is not a trust boundary on a shared machine (issue 15): with ``transport.local_auth`` the
    launcher makes the run's keys (private), and a local process without them cannot say hello or send
    experience; one with a key pair of its own is refused and counted."""
    import json
    import re

    import psutil

    from common import protocol
    from common.config import config_hash
    from tests.helpers import finish, metric_rows, start_tiny_launcher, wait_until

    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir, "transport.local_auth=true")
    try:
        wait_until(launcher, lambda: len(metric_rows(run_dir)) >= 1, "a first update")
        keys = run_dir / "keys"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert stat.S_IMODE((keys / "learner.key_secret").stat().st_mode) == 0o600
        learner = next(
            p for p in psutil.Process(launcher.pid).children() if " learner " in " ".join(p.cmdline())
        )
        cmdline = learner.cmdline()
        endpoints = Endpoints(**json.loads(cmdline[cmdline.index("--endpoints") + 1]))
        cfg = load_config(run_dir / "config.toml")
        make_keys(tmp_path / "other")
        shutil.copy(keys / "learner.key", tmp_path / "other" / "learner.key")
        with zmq_context() as ctx:
            strangers = [
                ActorSockets(ctx, endpoints, 2, None),
                ActorSockets(ctx, endpoints, 2, CurveKeys.load(tmp_path / "other", "actor")),
            ]
            forged = protocol.ExperienceBatch(0, 999, 0, (protocol.Sequence_(2, 1, 1.0, "stop"),) * 2,
                                              np.array([1, 2, 3] * 2, np.int32), np.array([-1.0] * 2, np.float32))  # fmt: skip
            for i, s in enumerate(strangers):
                s.request(protocol.Hello(actor_id=5 + i, config_hash=config_hash(cfg)))
                # Without the run's keys the connection never completes: nothing can even be queued for it.
                assert not s.send_experience(forged, timeout_ms=2000)
            rows_then = len(metric_rows(run_dir))
            wait_until(launcher, lambda: len(metric_rows(run_dir)) >= rows_then + 3, "three more updates")
            for s in strangers:
                s.close()
    finally:
        launcher.send_signal(2)
        log = finish(launcher, run_dir)
    assert launcher.returncode == 0, log[-3000:]
    rows = metric_rows(run_dir)
    assert not re.search(r"actor [56] joined", log)
    assert all(row["actors/connected"] <= 2 for row in rows)
    assert rows[-1]["reject/curve_denied"] >= 1  # the one with a key pair of its own
    assert all(group[1] != 999 for row in rows for group in row["trained/groups"])
