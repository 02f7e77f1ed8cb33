"""Each request rule, written once: the gateway checks a request against the model's `/info` card before it
queues anything (service/embedder.py), the worker checks every item again (prompts.py), with the same code,
message and param on both sides. Part of the shared layer: stdlib, the wire format and the methods' facts only,
never torch.

A rule reads its model off a `Card`: the gateway's `ModelInfo`, or the worker's `ModelSpec`, and what the card's
method allows off that method's facts (common/methods/). `model` is the name the messages use (the gateway's name
for the model, the worker's spec id).
"""

from __future__ import annotations

import math
from typing import Protocol

from common.methods import facts, which
from common.protocol import INVALID_INPUT, STEPS_OUT_OF_RANGE, TOKEN_OUT_OF_VOCAB, ItemError


class Card(Protocol):
    """What the rules read off a model."""

    @property
    def method(self) -> str: ...

    @property
    def min_refinement_steps(self) -> int: ...

    @property
    def max_refinement_steps(self) -> int: ...

    @property
    def default_refinement_steps(self) -> int: ...

    @property
    def max_thought_samples(self) -> int | None: ...  # None: unknown (a worker older than the field)


class ItemRejected(ValueError):
    """A broken rule; carries the error the client will see."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = ItemError(code=code, message=message, param=param)


def check_steps(model: str, card: Card, steps: int | None) -> int:
    """K (None: the model's default), which must lie in the model's range."""
    k = card.default_refinement_steps if steps is None else steps
    if not card.min_refinement_steps <= k <= card.max_refinement_steps:
        raise ItemRejected(
            STEPS_OUT_OF_RANGE,
            f"refinement_steps={k} is outside the range model {model!r} accepts: "
            f"{card.min_refinement_steps}..{card.max_refinement_steps}",
            "refinement_steps",
        )
    return k


def check_step_range(model: str, card: Card, lowest: int | None, highest: int) -> int:
    """The lowest K of a step range (`min_steps`; None: no range, `highest` alone), which must lie in the model's
    range and not above the range's highest."""
    if lowest is None:
        return highest
    if lowest > highest:
        raise ItemRejected(
            STEPS_OUT_OF_RANGE, f"refinement_steps min={lowest} is larger than max={highest}", "refinement_steps"
        )
    check_steps(model, card, lowest)
    return lowest


def check_step_options(model: str, method: str, tolerance: float | None, trajectory: bool) -> None:
    """Early exit (`refinement_steps: "auto"`, a tolerance) needs an embedding after every step, which only gircse
    has before its last one; an o1 thought has an embedding only once it ends."""
    if tolerance is not None:
        if not facts(method).early_exit:
            raise ItemRejected(
                INVALID_INPUT,
                f"refinement_steps 'auto' is only for {which(lambda m: m.early_exit)} models; "
                f"model {model!r} is {method}",
                "refinement_steps",
            )
        if not 0 <= tolerance < math.inf:
            raise ItemRejected(
                INVALID_INPUT, "refinement_tolerance must be a finite number >= 0", "refinement_tolerance"
            )
    if trajectory and not facts(method).trajectory:
        raise ItemRejected(
            INVALID_INPUT,
            f"return_trajectory is not available for {method} models: they have an embedding only once their steps end",
            "return_trajectory",
        )


def check_sampling(model: str, card: Card, seed: int | None, samples: int | None) -> None:
    """Only o1 samples (its thoughts); other methods ignore a seed but refuse a sample count."""
    if not facts(card.method).samples_thoughts:
        if samples is not None:
            raise ItemRejected(
                INVALID_INPUT, f"samples is only for {which(lambda m: m.samples_thoughts)} models", "samples"
            )
        return
    if seed is not None and seed < 0:
        raise ItemRejected(INVALID_INPUT, "seed must be a non-negative integer", "seed")
    most = card.max_thought_samples
    if samples is not None and most is not None and not 1 <= samples <= most:
        raise ItemRejected(
            INVALID_INPUT, f"samples={samples} is outside the range model {model!r} accepts: 1..{most}", "samples"
        )


def check_token_ids(model: str, ids: list[int], vocab_size: int) -> None:
    """Token-id inputs index the model's vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ItemRejected(
            TOKEN_OUT_OF_VOCAB,
            f"token id {bad} is outside the vocabulary of model {model!r} (0..{vocab_size - 1})",
            "input",
        )
