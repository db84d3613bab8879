"""Which CUDA GPU each process of a local run uses, and with how many others it shares it.

The rule (``place``), for M learner ranks, N actors and the host's G GPUs:

* G == 0 (a Mac, a CPU host, or no ``nvidia-smi``): as before this module, every process shares the one default
  device: no ``CUDA_VISIBLE_DEVICES``, device share ``"M,N"``.
* Learner rank ``r`` gets ``gpus[r % G]``: distinct GPUs when G >= M (what the ``nccl`` backend needs); with fewer
  GPUs than ranks (ring backend) ranks double up round-robin.
* When G > M the actors go round-robin over the GPUs no learner has (``gpus[M:]``): generation then never
  competes with a gradient step for memory or compute. Otherwise (G <= M) actor ``i`` goes to ``gpus[i % G]``,
  which for G == M is the GPU of its own rank (actor ``i`` belongs to rank ``i % M``).
* Each process's device share (``common/device_share.py``) counts only the learners and actors on its own GPU, so
  a learner alone on a GPU gets all of it and two actors alone on one get half each (``"0,2"``).

Each child sees its one GPU as device 0 (``CUDA_VISIBLE_DEVICES`` holds that GPU's id, an index or a UUID as the
host's list gave it). MIG instances are not listed by ``detect_gpus``; set ``CUDA_VISIBLE_DEVICES`` to their UUIDs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess

from common.device_share import SHARE_ENV, share_value

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessPlace:
    """One process's device: ``gpu`` its ``CUDA_VISIBLE_DEVICES`` value (None: no CUDA GPUs, leave it unset) and
    ``share`` the ``"learners,actors"`` count on that device."""

    gpu: str | None
    share: str

    def env(self) -> dict[str, str]:
        """The variables a child started in this place gets."""
        gpu = {} if self.gpu is None else {"CUDA_VISIBLE_DEVICES": self.gpu}
        return {**gpu, SHARE_ENV: self.share}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every process of a local run goes: ``learners[r]`` for rank ``r``, ``actors[i]`` for actor ``i``."""

    learners: tuple[ProcessPlace, ...]
    actors: tuple[ProcessPlace, ...]


def parse_visible_devices(value: str) -> list[str]:
    """The GPU ids in a ``CUDA_VISIBLE_DEVICES`` value. CUDA stops at the first invalid entry, and "-1" (or an
    empty value) is the usual way to hide every GPU."""
    gpus = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def parse_nvidia_smi(listing: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` output (one ``GPU i: NAME (UUID: ...)`` line per GPU; MIG lines under
    a GPU are indented and not counted)."""
    return [str(i) for i, _ in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def detect_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """This host's CUDA GPU ids: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``'s GPUs, else none."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return parse_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("nvidia-smi -L failed (%s): running as if this host had no CUDA GPU", err)
        return []
    return parse_nvidia_smi(out)


def place(num_learners: int, num_actors: int, gpus: list[str]) -> Placement:
    """Each learner rank's and actor's GPU and device share, by the rule in this module's docstring."""
    if not gpus:
        alone = ProcessPlace(None, share_value(num_learners, num_actors))
        return Placement((alone,) * num_learners, (alone,) * num_actors)
    learner_gpus = [gpus[r % len(gpus)] for r in range(num_learners)]
    actor_pool = gpus[num_learners:] if len(gpus) > num_learners else gpus
    actor_gpus = [actor_pool[i % len(actor_pool)] for i in range(num_actors)]

    def at(gpu: str) -> ProcessPlace:
        return ProcessPlace(gpu, share_value(learner_gpus.count(gpu), actor_gpus.count(gpu)))

    return Placement(tuple(map(at, learner_gpus)), tuple(map(at, actor_gpus)))


def describe(placement: Placement) -> list[str]:
    """One line per process: its name, GPU and device share (what the launcher logs)."""
    named = [(f"learner-{r}", p) for r, p in enumerate(placement.learners)]
    named += [(f"actor-{i}", p) for i, p in enumerate(placement.actors)]
    return [
        f"{name}: {'default device' if p.gpu is None else 'GPU ' + p.gpu}, device share {p.share} (learners,actors)"
        for name, p in named
    ]
