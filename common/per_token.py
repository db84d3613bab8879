"""The optional per-response-token arrays of an experience message (multi-turn episodes), checked on decode.

``loss_mask`` (uint8: 1 the model sampled the token, 0 an environment wrote it) and ``token_rewards`` (float32:
a reward on a model token, such as the reward of the turn it ends) each lie along the batch's response tokens,
like ``behaviour_logprobs``. ``common.protocol`` calls ``checked_per_token`` from its experience decoder; every
refusal is a ``ProtocolError`` with the short reason its receiver counts.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from common.wire import check

PER_TOKEN: Final = ("loss_mask", "token_rewards")
"""The optional per-response-token arrays, in frame order after ``tokens``, ``behaviour_logprobs`` and
``ref_logprobs`` (``None``: not sent, and no frame)."""


def _detail(name: str, array: np.ndarray) -> str:
    return f"{name} {array.dtype} {array.shape}"


def checked_loss_mask(mask: np.ndarray | None, n_response: int) -> np.ndarray | None:
    """``mask`` if it is 1-D uint8 of ``n_response`` zeros and ones (a message of another shape or value is
    refused as ``bad_dtype``, as v3 first shipped it)."""
    if mask is None:
        return None
    ok = mask.dtype == np.uint8 and mask.shape == (n_response,) and mask.max(initial=0) <= 1
    check(ok, "bad_dtype", _detail("loss_mask", mask))
    return mask


def checked_token_rewards(
    rewards: np.ndarray | None, n_response: int, mask: np.ndarray | None
) -> np.ndarray | None:
    """``rewards`` if it is 1-D float32 (else ``bad_dtype``), one per response token (else ``bad_lengths``),
    finite and 0 on every environment token of ``mask`` (else ``bad_rewards``: the model did not act there, so
    nothing it did earned that reward)."""
    if rewards is None:
        return None
    check(rewards.dtype == np.float32, "bad_dtype", _detail("token_rewards", rewards))
    check(
        rewards.shape == (n_response,),
        "bad_lengths",
        f"{rewards.shape} token rewards for {n_response} tokens",
    )
    check(bool(np.isfinite(rewards).all()), "bad_rewards", "token_rewards holds a non-finite value")
    on_environment = mask is not None and bool(np.any(rewards[mask == 0] != 0))
    check(not on_environment, "bad_rewards", "token_rewards nonzero on an environment token (loss_mask 0)")
    return rewards


def checked_per_token(arrays: dict[str, np.ndarray], n_response: int) -> dict[str, np.ndarray | None]:
    """The message's optional per-token arrays (``PER_TOKEN``), each checked; absent ones are None."""
    mask = checked_loss_mask(arrays.get("loss_mask"), n_response)
    return {
        "loss_mask": mask,
        "token_rewards": checked_token_rewards(arrays.get("token_rewards"), n_response, mask),
    }
