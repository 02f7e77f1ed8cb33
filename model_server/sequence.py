"""The plain-data contract between the engine and a method (numpy only: no torch, no wire types).

The engine owns its sequences and decides every iteration; it hands the method an `Iteration` (who decodes, who
joins with what input, who left) and gets an `IterationResult` back (who finished, with what). Nothing crosses
but these values and ids, so a method never mutates the engine's objects, and the engine can be driven by a
method with no model at all (tests/test_engine_contract.py). The same idea as vLLM's `SchedulerOutput` /
`ModelRunnerOutput` and TEI's `NextBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

#: a sequence's identity across iterations, given by the engine
SeqId = int


@dataclass(frozen=True)
class Params:
    """The per-input options compute code reads, typed (serving builds them from the request's item)."""

    tolerance: float | None = None  # gircse `refinement_steps: "auto"`: leave once a step moves it by less (1 - cos)
    seed: int | None = None  # o1: the thought sampler's seed (None: the method's default)
    sample: int = 0  # o1: which of an input's sampled thoughts this sequence is
    trajectory: bool = False  # keep the embedding after every step


@dataclass(frozen=True)
class Input:
    """One sequence's work: its prompt, its step budget and the KV positions it needs beyond them."""

    token_ids: list[int]
    steps: int
    reserve: int = 0  # KV positions beyond prompt + steps (o1: the EOS and <emb> after a thought)
    token_type_ids: list[int] | None = None  # segment ids of a (query, document) pair
    params: Params = field(default_factory=Params)

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kv_tokens(self) -> int:
        """Positions the sequence will occupy in a KV pool at its largest."""
        return self.prompt_tokens + self.steps + self.reserve


class Prepared(Protocol):
    """What `Engine.submit` takes: an `Input`, or anything carrying its fields (serving's `PreparedInput`)."""

    token_ids: list[int]
    steps: int
    reserve: int
    token_type_ids: list[int] | None

    @property
    def params(self) -> Params: ...


def as_input(prepared: Prepared) -> Input:
    """The engine's own plain copy of what it was given (nothing else of the caller's object goes along)."""
    if isinstance(prepared, Input):
        return prepared
    return Input(prepared.token_ids, prepared.steps, prepared.reserve, prepared.token_type_ids, prepared.params)


@dataclass(frozen=True)
class Joining:
    """A sequence that joins this iteration: its prefill is part of the pass."""

    id: SeqId
    input: Input


@dataclass(frozen=True)
class Iteration:
    """One forward pass as the engine decided it. `leave` (dropped: cancelled or past their deadline) are freed
    first; then every sequence in `decode` (all that run on from earlier passes) takes its next step and every
    one in `join` its prefill."""

    decode: list[SeqId]
    join: list[Joining]
    leave: list[SeqId] = field(default_factory=list)


@dataclass
class Embedded:
    """What a finished sequence yields: its vector, the steps it ran, and (when asked for) the embedding
    after each of those steps, whose last row is the vector."""

    vector: np.ndarray
    steps: int
    trajectory: np.ndarray | None = None  # [steps, D], float32


@dataclass(frozen=True)
class IterationResult:
    """What the pass finished; a finished sequence is gone from the method (its slot freed) when it returns."""

    finished: dict[SeqId, Embedded]


class Method(Protocol):
    """What the engine needs of a method."""

    #: whether sequences live on between iterations (False: each finishes in its first pass)
    stateful: bool
    #: whether a pass pays for its widest sequence in every row (padded batches), not for its tokens (packed)
    padded: bool

    def step(self, iteration: Iteration) -> IterationResult: ...

    def clear(self) -> None:
        """Forget every sequence (after a failed pass)."""
