"""What the example trainers share: build the run's settings and start it through the Python API's launcher.

A trainer is thin on purpose: a TOML config in ``examples/configs/``, a prompt file in ``examples/data/`` and a
reward ``module:function``; ``train_on_dataset`` turns them into the command ``mlx_ppo.launch_command`` builds
(``python launch.py --config ... --set run.prompts=... --set run.reward=...``, exactly what a user would type)
and runs it with ``mlx_ppo.follow_run``, as ``PPOTrainer`` does: the same epochs and callbacks. Unlike
``PPOTrainer.train`` the run goes straight into the trainer's run directory and logs to this terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from mlx_ppo import follow_run, launch_command
from mlx_ppo.trainer import Callback

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent


class ExampleTrainer:
    """Starts ``launch.py`` with an example's config, prompts and reward; subclasses set the class variables."""

    name: ClassVar[str]
    """Used for ``examples/configs/<name>.toml`` and the default run folder ``runs/examples/<name>``."""
    data: ClassVar[str]
    """The bundled prompt file, relative to ``examples/data``."""
    reward: ClassVar[str]
    """``run.reward``: the example's reward function as ``module:function`` (or ``rm:PATH``)."""

    def __init__(
        self,
        model: str = "default",
        run_dir: str | Path | None = None,
        actors: int = 1,
        overrides: Sequence[str] = (),
    ):
        self.model, self.actors, self.overrides = model, actors, list(overrides)
        self.run_dir = Path(run_dir or REPO / "runs" / "examples" / self.name).resolve()

    @property
    def config_path(self) -> Path:
        return EXAMPLES / "configs" / f"{self.name}.toml"

    def prompts_spec(self, name_or_path: str | Path | None) -> str:
        """``run.prompts`` for a dataset argument: None takes the bundled file, ``hf:...`` stays, else a path."""
        if name_or_path is None:
            return str(EXAMPLES / "data" / self.data)
        if str(name_or_path).startswith("hf:"):
            return str(name_or_path)
        return str(Path(name_or_path).expanduser().resolve())  # actors may run in another directory

    def updates_for(self, prompts: str, num_epochs: float) -> int:
        """Updates that show every prompt ``num_epochs`` times."""
        from actors.rewards import load_prompt_records
        from common.config import load_config

        if prompts.startswith("hf:"):
            raise ValueError("a Hugging Face dataset has no size known ahead: pass max_updates")
        cfg = load_config(self.config_path, self.overrides)
        per_update = cfg.ppo.batch_size // cfg.ppo.group_size
        return max(1, math.ceil(len(load_prompt_records(prompts)[0]) * num_epochs / per_update))

    def command(self, prompts: str, max_updates: int) -> list[str]:
        """The launcher command line this trainer runs."""
        settings = [f"model.name={json.dumps(self.model)}", f"run.run_dir={json.dumps(str(self.run_dir))}"]
        settings += [f"run.prompts={json.dumps(prompts)}", f"run.reward={json.dumps(self.reward)}"]
        settings += [f"run.max_updates={max_updates}", *self.overrides]
        return launch_command(self.config_path, self.actors, 1, settings)

    def train_on_dataset(
        self,
        name_or_path: str | Path | None = None,
        num_epochs: float = 1.0,
        max_updates: int | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> int:
        """Train on a prompt file (.jsonl/.txt; None: the bundled one) or ``hf:NAME[:SPLIT[:FIELD]]`` for
        ``num_epochs`` passes (or exactly ``max_updates`` updates), calling each callback with ``(epoch,
        metrics)`` after every pass (``PPOTrainer.train``'s callbacks). Returns the launcher's exit code."""
        prompts = self.prompts_spec(name_or_path)
        updates = max_updates or self.updates_for(prompts, num_epochs)
        per_epoch = updates if prompts.startswith("hf:") else self.updates_for(prompts, 1.0)
        command = self.command(prompts, updates)
        logger.info("running %s", " ".join(command))
        code, _epochs = follow_run(command, self.run_dir / "metrics.jsonl", per_epoch, callbacks)
        return code


def example_main(trainer_cls: type[ExampleTrainer], argv: Sequence[str], **extra: str) -> int:
    """The command line every example shares (``python -m examples.NAME --model tiny --max-updates 2``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m examples.{trainer_cls.name}", description=trainer_cls.__doc__
    )
    parser.add_argument("--model", default="default", help="default, tiny, a model folder or a hub id")
    parser.add_argument(
        "--data", help="prompt file (.jsonl/.txt) or hf:NAME[:SPLIT[:FIELD]]; default: bundled"
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates instead")
    parser.add_argument("--run-dir", help=f"default: runs/examples/{trainer_cls.name}")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    for flag, help_text in extra.items():
        parser.add_argument(flag, help=help_text)
    args = parser.parse_args(list(argv))
    options = {k: v for k, v in vars(args).items() if k not in ("data", "epochs", "max_updates")}
    trainer = trainer_cls(**options)
    return trainer.train_on_dataset(args.data, args.epochs, args.max_updates)
