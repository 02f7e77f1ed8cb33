"""The method interface: what one forward pass computes for the sequences the engine picked.

A method gets plain data from the engine (`sequence.Iteration`: ids, inputs, typed parameters) and returns plain
data (`sequence.IterationResult`: who finished, with what); it keeps whatever it carries between passes itself,
by sequence id, and a decoder method's KV slots live in its runner (model_server/runners/).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import numpy as np
import torch

from model_server.loading import LoadedModel
from model_server.prompts import PromptBuilder
from model_server.runners import Prefill, Runner, build_runner
from model_server.sequence import Embedded, Iteration, IterationResult, Joining, SeqId

#: a decoder method's own state of one sequence between passes (gircse: `Refinement`, o1: `Thought`)
State = TypeVar("State")


class EngineMethod(ABC):
    """One embedding method; satisfies the engine's `sequence.Method`."""

    #: whether sequences live on between iterations (False: all happens in their first pass)
    stateful: bool = True
    #: whether a pass pays for its widest sequence in every row (a padded batch) rather than for its tokens
    padded: bool = False

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.prompts = PromptBuilder(loaded.spec, loaded.tokenizer, loaded.vocab_size)

    @property
    def runner_kind(self) -> str:
        """Which path computes the passes (`/info`): "hf", the model's own forward, unless a runner says otherwise."""
        return "hf"

    @abstractmethod
    def step(self, iteration: Iteration) -> IterationResult:
        """One forward pass: free `leave`, the next step of every sequence in `decode`, the first pass of `join`;
        what finished (and is forgotten)."""

    def clear(self) -> None:  # noqa: B027 (stateless methods hold nothing)
        """Forget every sequence (after a failed pass)."""

    def embedded(
        self, vector: torch.Tensor, steps: int, keep_trajectory: bool, trajectory: torch.Tensor | None = None
    ) -> Embedded:
        """A finished sequence's result. `steps`: those that ran; `trajectory`: [steps, D] un-normalised
        embeddings after each step, kept only when the input asked for them (`keep_trajectory`)."""
        if self.loaded.spec.normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        rows = None
        if keep_trajectory:
            if trajectory is None:
                trajectory = vector.new_zeros((0, vector.shape[-1]))
            elif self.loaded.spec.normalize:
                trajectory = torch.nn.functional.normalize(trajectory, dim=-1)
            rows = trajectory.float().cpu().numpy()
        return Embedded(vector.float().cpu().numpy(), steps, rows)

    def combine(self, samples: list[Embedded]) -> Embedded:
        """One input's result from its samples' (o1 runs n thoughts): their mean, renormalised
        when the spec normalises (the direction is the research code's plain mean)."""
        if len(samples) == 1:
            return samples[0]
        mean = np.mean([s.vector for s in samples], axis=0, dtype=np.float64)
        if self.loaded.spec.normalize:
            mean /= np.linalg.norm(mean)
        return Embedded(mean.astype(np.float32), samples[0].steps)


class DecoderMethod(EngineMethod, Generic[State]):
    """A method over a causal decoder whose sequences own slots of its runner's KV; `states` holds each running
    sequence's own state. A finished or left sequence is removed from both here, in `_forget`."""

    def __init__(self, loaded: LoadedModel, max_seqs: int) -> None:
        super().__init__(loaded)
        self.runner: Runner = build_runner(loaded, max_seqs)
        self.embeddings = loaded.model.get_input_embeddings()
        self.states: dict[SeqId, State] = {}

    @property
    def runner_kind(self) -> str:
        return self.runner.kind

    def step(self, iteration: Iteration) -> IterationResult:
        self._forget(iteration.leave)
        if set(iteration.decode) != self.states.keys():
            raise ValueError("every running sequence decodes in every pass: the engine's and the method's differ")
        if not iteration.decode and not iteration.join:
            return IterationResult({})
        finished = self._pass(iteration.join)
        self._forget(finished)
        return IterationResult(finished)

    @abstractmethod
    def _pass(self, join: list[Joining]) -> dict[SeqId, Embedded]:
        """The forward pass: every running slot (`runner.order`) decodes, `join` prefills; what finished."""

    def _forget(self, ids: list[SeqId] | dict[SeqId, Embedded]) -> None:
        self.runner.remove(ids)
        for i in ids:
            self.states.pop(i, None)

    def prompt_embeddings(self, join: list[Joining]) -> list[Prefill]:
        device = self.loaded.device
        return [
            Prefill(j.id, self.embeddings(torch.tensor(j.input.token_ids, device=device)), j.input.kv_tokens)
            for j in join
        ]

    def clear(self) -> None:
        self.runner.clear()
        self.states.clear()
