"""Environments the process tests run through ``run.environment = "tests.env_samples:..."``: one that misbehaves
in every way an actor must survive, chosen per record (its "kind" field, from the run's prompt file)."""

import threading

from actors.environments import StepResult

_NEVER = threading.Event()


class Unruly:
    """Per record "kind": 'ok' (two turns, reward 0.5 each), 'raise' (its step raises), 'hang' (its step never
    returns), 'flood' (answers a million characters, then ends like 'ok')."""

    max_turns = 2

    def reset(self, record: dict) -> str:
        self.kind, self.turn = record["kind"], 0
        return f"Say anything ({self.kind})."

    def step(self, action_text: str) -> StepResult:
        self.turn += 1
        if self.kind == "raise":
            raise RuntimeError("the tool crashed")
        if self.kind == "hang":
            _NEVER.wait(120)  # past any step timeout a test sets; the actor must not wait for it
        text = "x" * 1_000_000 if self.kind == "flood" else "go on"
        return StepResult(text, reward=0.5, done=self.turn >= self.max_turns)
