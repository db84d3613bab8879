"""Where a local run's processes go on a host of G CUDA GPUs (fake device lists: no GPU is needed), the device
share each child gets, the per-child environment the launcher builds, and when ``--learners M`` may use nccl."""

import os
from collections import Counter

import pytest

from common.device_share import SHARE_ENV, memory_part, share_env
from launcher.gpu_placement import detect_gpus, parse_nvidia_smi, parse_visible_devices, place

GPU_LISTS = {0: [], 1: ["0"], 2: ["0", "1"], 4: ["0", "1", "2", "3"]}


@pytest.mark.parametrize("num_gpus", sorted(GPU_LISTS))
@pytest.mark.parametrize("num_learners", [1, 2])
@pytest.mark.parametrize("num_actors", [1, 2, 3, 4])
def test_every_process_gets_a_gpu_and_a_share_of_only_its_own_gpu(num_gpus, num_learners, num_actors):
    gpus = GPU_LISTS[num_gpus]
    placement = place(num_learners, num_actors, gpus)
    assert len(placement.learners) == num_learners and len(placement.actors) == num_actors
    everyone = [("learner", p) for p in placement.learners] + [("actor", p) for p in placement.actors]
    if not gpus:  # a Mac or a CPU host: exactly as before, one device shared by all
        assert all(p.gpu is None and p.env() == share_env(num_learners, num_actors) for _, p in everyone)
        return
    assert all(p.gpu in gpus and p.env()["CUDA_VISIBLE_DEVICES"] == p.gpu for _, p in everyone)
    learner_gpus = [p.gpu for p in placement.learners]
    if num_gpus >= num_learners:
        assert len(set(learner_gpus)) == num_learners  # each rank its own GPU (what nccl needs)
    if num_gpus > num_learners:
        assert not {p.gpu for p in placement.actors} & set(learner_gpus)  # actors on the learner-free GPUs
    learners_on, actors_on = Counter(learner_gpus), Counter(p.gpu for p in placement.actors)
    parts_on: Counter = Counter()
    for role, p in everyone:
        assert p.share == f"{learners_on[p.gpu]},{actors_on[p.gpu]}"
        parts_on[p.gpu] += memory_part(role, p.env()[SHARE_ENV])
    assert all(0 < total <= 1 + 1e-9 for total in parts_on.values()), parts_on


def test_the_rule_on_two_and_four_gpus():
    two = place(2, 4, ["0", "1"])  # G == M: actor i on its own rank's GPU
    assert [p.gpu for p in two.learners] == ["0", "1"] and [p.gpu for p in two.actors] == ["0", "1", "0", "1"]
    assert {p.share for p in two.learners + two.actors} == {"1,2"}
    one_learner = place(1, 2, ["0", "1"])  # the learner alone on GPU 0, both actors on GPU 1
    assert one_learner.learners[0].share == "1,0" and memory_part("learner", "1,0") == 1.0
    assert [(p.gpu, p.share) for p in one_learner.actors] == [("1", "0,2"), ("1", "0,2")]
    four = place(2, 3, ["4", "5", "6", "7"])  # ids as the host lists them, not positions
    assert [p.gpu for p in four.learners] == ["4", "5"] and [p.gpu for p in four.actors] == ["6", "7", "6"]
    assert [p.share for p in four.actors] == ["0,2", "0,1", "0,2"]
    ranks_share = place(2, 2, ["0"])  # fewer GPUs than ranks (ring): as on one device today
    assert {p.share for p in ranks_share.learners + ranks_share.actors} == {"2,2"}


def test_a_gpu_of_actors_only_is_split_between_them():
    assert memory_part("actor", "0,2") == pytest.approx(0.5)
    assert memory_part("actor", "0,4") == pytest.approx(0.25)
    assert memory_part("actor", "0,1") == 1.0  # alone on its GPU
    assert memory_part("actor", "-1,2") == 1.0  # malformed: the whole device


def test_the_host_gpus_come_from_cuda_visible_devices_else_nvidia_smi(tmp_path, monkeypatch):
    assert parse_visible_devices("0,1") == ["0", "1"]
    assert parse_visible_devices(" 2, GPU-8f2a ") == ["2", "GPU-8f2a"]
    assert parse_visible_devices("") == parse_visible_devices("-1") == []
    assert parse_visible_devices("0,-1,1") == ["0"]  # CUDA stops at the first invalid entry
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    listing = (
        "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\n  MIG 3g.71gb Device 0: (UUID: MIG-bbbb)\n"
        "GPU 1: NVIDIA H200 (UUID: GPU-cccc)\n"
    )
    assert parse_nvidia_smi(listing) == ["0", "1"]
    fake = tmp_path / "nvidia-smi"  # a real program on PATH that prints what nvidia-smi -L prints
    (tmp_path / "listing.txt").write_text(listing)
    fake.write_text(f'#!/bin/sh\n[ "$1" = -L ] && exec cat "{tmp_path / "listing.txt"}"\nexit 9\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus({}) == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert detect_gpus({}) == []  # no nvidia-smi: no CUDA GPUs (a Mac, a CPU host)


def config(tmp_path, backend: str):
    from common.config import load_config

    return load_config(None, [f'run.backend="{backend}"', f'run.run_dir="{tmp_path}"'])


def test_nccl_children_get_their_rank_gpu_and_multicast_off(tmp_path, monkeypatch):
    from launcher.local import child_envs

    monkeypatch.setenv("MLX_RANK", "7")  # a launcher started inside another group passes none of it on
    monkeypatch.setenv("NCCL_PORT", "1")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")  # the user's NCCL tuning does pass on
    learners, actors = child_envs(config(tmp_path, "nccl"), place(2, 3, ["0", "1"]), 4, 1)
    assert [e["MLX_RANK"] for e in learners] == ["0", "1"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in learners] == ["0", "1"]
    assert {e["MLX_WORLD_SIZE"] for e in learners} == {"2"} and {e["NCCL_NVLS_ENABLE"] for e in learners} == {
        "0"
    }
    assert len({e["NCCL_PORT"] for e in learners}) == 1 and learners[0]["NCCL_PORT"] != "1"
    assert {e["NCCL_HOST_IP"] for e in learners} == {"127.0.0.1"} and learners[0][
        "OPENBLAS_NUM_THREADS"
    ] == "4"
    assert [e["CUDA_VISIBLE_DEVICES"] for e in actors] == ["0", "1", "0"]
    assert [e[SHARE_ENV] for e in actors] == ["1,2", "1,1", "1,2"] and learners[0][SHARE_ENV] == "1,2"
    assert all("MLX_RANK" not in e and "NCCL_PORT" not in e and e["NCCL_DEBUG"] == "WARN" for e in actors)


def test_without_gpus_ring_children_get_what_they_got_before(tmp_path, monkeypatch):
    from launcher.local import child_envs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    learners, actors = child_envs(config(tmp_path, "ring"), place(2, 2, []), 1, 1)
    assert [e["MLX_RANK"] for e in learners] == ["0", "1"]
    assert {e["MLX_HOSTFILE"] for e in learners} == {str(tmp_path / "ring_hostfile.json")}
    assert all(e[SHARE_ENV] == "2,2" and "CUDA_VISIBLE_DEVICES" not in e for e in learners + actors)
    assert all("MLX_HOSTFILE" not in e for e in actors)


def test_nccl_ranks_on_one_machine_need_a_gpu_each(tmp_path):
    from launcher.local import local_run_problems

    nccl = config(tmp_path, "nccl")
    assert local_run_problems(nccl, 2, 2, ["0", "1"]) == []
    assert local_run_problems(nccl, 4, 4, ["0", "1", "2", "3", "4"]) == []
    assert local_run_problems(nccl, 2, 1, []) == []  # one rank joins no group
    (few,) = local_run_problems(nccl, 4, 4, ["0", "1"])
    assert "needs one CUDA GPU per rank; this host has 2" in few and "--learners 2" in few
    (none,) = local_run_problems(nccl, 2, 2, [])
    assert "this host has 0" in none and "--backend ring" in none
    assert local_run_problems(config(tmp_path, "ring"), 2, 2, []) == []
    (mpi,) = local_run_problems(config(tmp_path, "mpi"), 2, 2, ["0", "1"])
    assert "mlx.launch" in mpi
