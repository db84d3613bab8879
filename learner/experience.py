"""``Experience``: the one batch type from an actor's message through the buffer to the update, NumPy throughout.

It holds the message's own layout: each sequence's tokens (prompt, then response) and its per-response-token
log-probs as ``Ragged`` rows (``common/ragged.py``), and one entry per sequence of the rest. The buffer keeps
groups of it, a batch is their ``concat``, and the update pads it once (``padded``) into the ``[B, T]`` arrays its
compiled steps read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.logprobs import pad_sequences, round_up
from common.protocol import ExperienceBatch
from common.ragged import Ragged


@dataclass
class Experience:
    """``B`` sampled sequences with their scores (unpadded)."""

    tokens: Ragged
    """Per sequence, int32: its prompt then its response."""
    prompt_lens: np.ndarray
    """``[B]`` int64 prompt tokens of each sequence (the rest of its row is the response)."""
    behaviour: Ragged
    """Per sequence, float32: the behaviour log-prob of each response token."""
    scores: np.ndarray
    """``[B]`` sequence scores."""
    policy_versions: np.ndarray
    """``[B]`` policy version each sequence was sampled with."""
    ref: Ragged | None = None
    """Per sequence, float32: reference log-probs of its response tokens, when actors computed them."""
    truncated: np.ndarray | None = None
    """``[B]`` bool: the response was cut at ``sampling.max_new_tokens`` (None: none was)."""
    loss_mask: Ragged | None = None
    """Per sequence, uint8 per response token: 1 the model's (trained on), 0 an environment's turn (multi-turn
    episodes: context only). None: every response token is the model's."""
    token_rewards: Ragged | None = None
    """Per sequence, float32 per response token: rewards earned at model tokens (a turn's reward on its last
    token; 0 on environment tokens); ``scores`` stay the episode returns (``learner/advantages.py``'s
    ``shape_rewards`` puts what these leave of a score on the last model token). None: the scores alone."""
    origins: list[tuple[int, int, int]] | None = None
    """Per group: ``(actor id, batch id, prompt index)``, reported in the update's metrics (``trained/groups``)."""

    @classmethod
    def from_message(cls, msg: ExperienceBatch) -> Experience:
        """The sequences of a decoded actor message (its arrays are viewed, not copied)."""
        prompt_lens = np.array([s.prompt_len for s in msg.sequences], np.int64)
        response_lens = np.array([s.response_len for s in msg.sequences], np.int64)
        ref, rewards = msg.ref_logprobs, msg.token_rewards
        return cls(
            tokens=Ragged.from_lengths(msg.tokens, prompt_lens + response_lens),
            prompt_lens=prompt_lens,
            behaviour=Ragged.from_lengths(msg.behaviour_logprobs, response_lens),
            scores=np.array([s.score for s in msg.sequences], np.float64),
            policy_versions=np.full(len(msg.sequences), msg.policy_version, np.int64),
            ref=None if ref is None else Ragged.from_lengths(ref, response_lens),
            truncated=np.array([s.finish_reason == "length" for s in msg.sequences], bool),
            loss_mask=None if msg.loss_mask is None else Ragged.from_lengths(msg.loss_mask, response_lens),
            token_rewards=None if rewards is None else Ragged.from_lengths(rewards, response_lens),
        )

    @classmethod
    def from_rows(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        behaviour: Sequence[Sequence[float]],
        scores: np.ndarray,
        policy_versions: np.ndarray,
        ref: Sequence[Sequence[float]] | None = None,
        truncated: np.ndarray | None = None,
        loss_mask: Sequence[Sequence[int]] | None = None,
        token_rewards: Sequence[Sequence[float]] | None = None,
    ) -> Experience:
        """Sequences given one by one (sampler completions, episodes, tests, benchmarks)."""
        return cls(
            tokens=Ragged.from_rows(
                [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)], np.int32
            ),
            prompt_lens=np.array([len(p) for p in prompts], np.int64),
            behaviour=Ragged.from_rows(behaviour, np.float32),
            scores=np.asarray(scores),
            policy_versions=np.asarray(policy_versions),
            ref=None if ref is None else Ragged.from_rows(ref, np.float32),
            truncated=truncated,
            loss_mask=None if loss_mask is None else Ragged.from_rows(loss_mask, np.uint8),
            token_rewards=None if token_rewards is None else Ragged.from_rows(token_rewards, np.float32),
        )

    @classmethod
    def concat(cls, parts: Sequence[Experience]) -> Experience:
        """The sequences of ``parts`` in order (reference log-probs only if every part has them; a loss mask or
        token rewards if any part has them, the others' being all ones / all zeros, which mean the same as none)."""
        with_ref = all(p.ref is not None for p in parts)
        with_truncated = all(p.truncated is not None for p in parts)
        with_mask = any(p.loss_mask is not None for p in parts)
        with_rewards = any(p.token_rewards is not None for p in parts)
        return cls(
            tokens=Ragged.concat([p.tokens for p in parts]),
            prompt_lens=np.concatenate([p.prompt_lens for p in parts]),
            behaviour=Ragged.concat([p.behaviour for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            policy_versions=np.concatenate([p.policy_versions for p in parts]),
            ref=Ragged.concat([p.ref for p in parts]) if with_ref else None,
            truncated=np.concatenate([p.truncated for p in parts]) if with_truncated else None,
            loss_mask=Ragged.concat([p.model_token_mask() for p in parts]) if with_mask else None,
            token_rewards=Ragged.concat([p.token_reward_rows() for p in parts]) if with_rewards else None,
        )

    def select(self, rows: np.ndarray | slice) -> Experience:
        """The sequences ``rows`` (an index array or a slice); ``origins`` are left out (they are per group)."""
        return Experience(
            tokens=self.tokens.select(rows),
            prompt_lens=self.prompt_lens[rows],
            behaviour=self.behaviour.select(rows),
            scores=self.scores[rows],
            policy_versions=self.policy_versions[rows],
            ref=None if self.ref is None else self.ref.select(rows),
            truncated=None if self.truncated is None else self.truncated[rows],
            loss_mask=None if self.loss_mask is None else self.loss_mask.select(rows),
            token_rewards=None if self.token_rewards is None else self.token_rewards.select(rows),
        )

    def model_token_mask(self) -> Ragged:
        """``loss_mask``, or all ones when every response token is the model's."""
        if self.loss_mask is not None:
            return self.loss_mask
        return Ragged.from_lengths(np.ones(int(self.response_lens.sum()), np.uint8), self.response_lens)

    def token_reward_rows(self) -> Ragged:
        """``token_rewards``, or all zeros (every score then lands on its last model token, as without them)."""
        if self.token_rewards is not None:
            return self.token_rewards
        return Ragged.from_lengths(np.zeros(int(self.response_lens.sum()), np.float32), self.response_lens)

    @property
    def size(self) -> int:
        return len(self.prompt_lens)

    @property
    def response_lens(self) -> np.ndarray:
        """``[B]`` int64 response tokens of each sequence."""
        return self.tokens.lengths - self.prompt_lens

    def prompt(self, b: int) -> np.ndarray:
        return self.tokens[b][: self.prompt_lens[b]]

    def response(self, b: int) -> np.ndarray:
        return self.tokens[b][self.prompt_lens[b] :]

    def padded(self, pad_multiple: int = 32) -> dict[str, np.ndarray]:
        """The update's arrays (``common/logprobs.py``'s ``pad_sequences``, lengths rounded up to
        ``pad_multiple``): ``tokens [B, L]``, and over response tokens ``positions``, ``response``, ``mask`` and
        ``behaviour`` ``[B, T]`` (with ``ref [B, T]`` when the actors sent reference log-probs, and
        ``model_tokens [B, T]``, 1/0, when environment turns are among the responses, and ``token_rewards
        [B, T]`` when the actors sent rewards per token)."""
        tokens, positions, response, mask = pad_sequences(self.tokens, self.prompt_lens, pad_multiple)
        steps = mask.shape[1]
        arrays = {"tokens": tokens, "positions": positions, "response": response, "mask": mask}
        arrays["behaviour"] = self.behaviour.padded(steps).astype(np.float32)
        if self.ref is not None:
            arrays["ref"] = self.ref.padded(steps).astype(np.float32)
        if self.loss_mask is not None:
            arrays["model_tokens"] = self.loss_mask.padded(steps).astype(np.float32)
        if self.token_rewards is not None:
            arrays["token_rewards"] = self.token_rewards.padded(steps).astype(np.float32)
        return arrays


def masked_extent(mask: np.ndarray) -> np.ndarray:
    """``[B]`` int64: one past each row's last masked token (0 for an empty row). The mask's sum when it is a
    prefix; with multi-turn episodes' model-token masks (environment turns 0 between them) it is more."""
    present = np.asarray(mask) > 0
    last = present.shape[1] - np.argmax(present[:, ::-1], axis=1)
    return np.where(present.any(axis=1), last, 0).astype(np.int64)


def sequence_lengths(arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Tokens (prompt + response) of each padded row of ``rows`` that its masked tokens need, read off
    ``padded``'s ``positions`` and ``mask``: the last masked token (``r - 1``) is predicted at
    ``positions[r - 1]``, so the row ends one token after it."""
    response_lens = masked_extent(arrays["mask"][rows])
    last = arrays["positions"][rows, np.maximum(response_lens - 1, 0)]
    return last.astype(np.int64) + 1 + (response_lens > 0)


def rows_cut_to_length(
    arrays: dict[str, np.ndarray], rows: np.ndarray, multiple: int
) -> dict[str, np.ndarray]:
    """``arrays`` at ``rows``, their padding cut to those rows' own longest sequence and response (rounded up to
    ``multiple``, so compiled steps see few shapes): a micro-batch of short answers does not compute the batch's
    longest. Per-token arrays are the ``[B, T]`` ones; masked-out columns only are dropped (those after each
    row's last masked token: a multi-turn mask's environment turns in between stay), so every masked sum (the
    loss, the statistics) is unchanged."""
    steps, width = arrays["mask"].shape[1], arrays["tokens"].shape[1]
    response_lens = masked_extent(arrays["mask"][rows])
    keep_steps = min(round_up(max(int(response_lens.max(initial=0)), 1), multiple), steps)
    keep_width = min(round_up(int(sequence_lengths(arrays, rows).max(initial=1)), multiple), width)
    cut = {}
    for key, values in arrays.items():
        values = values[rows]
        if key == "tokens":
            values = values[:, :keep_width]
        elif values.ndim == 2 and values.shape[1] == steps:
            values = values[:, :keep_steps]
        cut[key] = values
    cut["positions"] = np.minimum(cut["positions"], keep_width - 1)  # padding's positions stay inside
    return cut


def by_length(arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """``rows`` from the shortest sequence to the longest (ties in order), so that consecutive micro-batches
    hold sequences of similar lengths and ``rows_cut_to_length`` cuts most."""
    return rows[np.argsort(sequence_lengths(arrays, rows), kind="stable")]
