"""A separate virtual environment for the peer trainer mlx-lm-lora (``bench/peer_mlx_lm_lora.py``).

mlx-lm-lora is kept out of the project's own environment: its metadata asks for ``mlx>=0.32.3``, ``transformers``
and Hugging Face ``datasets`` (pyarrow, pandas, ...), and an install there could move the mlx the project is
pinned to. Its GRPO path needs none of ``datasets`` (imported only inside the functions that fetch hub data sets)
nor ``mcp`` (an extra): so mlx and mlx-lm are installed at the project's pins first, and mlx-lm-lora on top with
``--no-deps``; everything else it imports (transformers, huggingface_hub, numpy, pyyaml, jinja2, protobuf, tqdm)
comes with mlx-lm. Nothing can then upgrade mlx.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

logger = logging.getLogger(__name__)

VENV_NAME = ".venv-peer"
MLX_VERSION = "0.32.4"
MLX_LM_VERSION = "0.32.2"
MLX_LM_LORA_VERSION = "5.10.2"
# Proves the peer can run: the versions are the pinned ones and its GRPO trainer imports.
_CHECK = (
    "import importlib.metadata as m, sys; "
    "import mlx.core, mlx_lm, mlx_lm_lora.trainer.grpo_trainer, mlx_lm_lora.utils; "
    "got = [m.version(n) for n in ('mlx', 'mlx-lm', 'mlx-lm-lora')]; "
    "sys.exit(0 if got == sys.argv[1:] else 1)"
)


def _mlx_requirement() -> str:
    """Plain mlx on macOS (Metal and Accelerate); on Linux the wheel needs a backend extra, the CPU one here."""
    return f"mlx=={MLX_VERSION}" if sys.platform == "darwin" else f"mlx[cpu]=={MLX_VERSION}"


def venv_python(env_dir: Path) -> Path:
    """The interpreter of the virtual environment at ``env_dir`` (``Scripts`` on Windows, ``bin`` elsewhere)."""
    return env_dir / "Scripts" / "python.exe" if os.name == "nt" else env_dir / "bin" / "python"


def _works(python: Path, tries: int = 2) -> bool:
    """Whether ``python`` exists, has the pinned versions and imports mlx-lm-lora's GRPO trainer.

    A failed check is tried again once: on a loaded machine the import alone can outlast the timeout, and a
    wrong "broken" verdict would delete a good environment."""
    if not python.exists():
        return False
    pins = [MLX_VERSION, MLX_LM_VERSION, MLX_LM_LORA_VERSION]
    for attempt in range(1, tries + 1):
        try:
            done = subprocess.run([str(python), "-c", _CHECK, *pins], capture_output=True, timeout=300)
            if done.returncode == 0:
                return True
            logger.warning("peer env check %d of %d failed: %s", attempt, tries, done.stderr.decode()[-500:])
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("peer env check %d of %d failed: %s", attempt, tries, e)
    return False


def _pip(python: Path, *args: str) -> None:
    """Run ``python -m pip install ARGS``; its output goes to the log only when it fails."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    logger.info("peer env: %s", " ".join(cmd[3:]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        logger.error("pip failed:\n%s%s", done.stdout[-4000:], done.stderr[-4000:])
        raise RuntimeError(f"pip install {' '.join(args)} failed (exit {done.returncode}); see the log above")


def ensure_peer_python(root: Path) -> Path:
    """The python of ``root/.venv-peer``, with mlx, mlx-lm and mlx-lm-lora at their pins; built when missing.

    An environment that exists and passes the check is reused as it is; a broken or outdated one is deleted
    and built again (a few minutes: transformers and its dependencies come from the package index). Two
    processes building it at the same time are not guarded against.
    """
    env_dir = Path(root) / VENV_NAME
    python = venv_python(env_dir)
    if _works(python):
        logger.info("peer env: reusing %s", env_dir)
        return python
    if env_dir.is_symlink():  # someone else's environment: never delete what the link points to
        raise RuntimeError(
            f"{env_dir} is a link to an environment that fails the check; fix or remove the link"
        )
    if env_dir.exists():
        logger.warning("peer env: %s is missing packages or has other versions; rebuilding it", env_dir)
        shutil.rmtree(env_dir)
    logger.info("peer env: creating %s", env_dir)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    _pip(python, _mlx_requirement(), f"mlx-lm=={MLX_LM_VERSION}", "tqdm")
    _pip(python, "--no-deps", f"mlx-lm-lora=={MLX_LM_LORA_VERSION}")
    if not _works(python):
        raise RuntimeError(
            f"the peer environment {env_dir} was built but mlx-lm-lora's GRPO trainer fails to import"
        )
    return python


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.stdout.write(f"{ensure_peer_python(Path(__file__).resolve().parents[1])}\n")
