"""What the engine and the methods share: a sequence's state and the method interface."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model_server.hf_runner import HFRunner
from model_server.loading import LoadedModel
from model_server.packed import pack_for_serving
from model_server.prompts import PreparedInput, PromptBuilder
from common.protocol import Priority
from model_server.runner import FAMILIES, DecoderRunner

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """What a finished sequence yields: its vector, the steps it ran, and (when asked for) the embedding
    after each of those steps, whose last row is the vector."""

    vector: np.ndarray
    steps: int
    trajectory: np.ndarray | None = None  # [steps, D], float32


@dataclass(eq=False)
class Sequence:
    """One input in flight: what the engine schedules by (its prompt, its step budget, its KV positions), its
    future and result, and the method's own state carried between steps."""

    prepared: PreparedInput
    future: Future = field(default_factory=Future)
    result: Embedded | None = None  # set by the method when the sequence is finished
    state: Any = None  # the method's own per-sequence state (gircse: `Refinement`, o1: `Thought`)
    deadline: float | None = None  # time.monotonic() after which nobody reads its answer: dropped, not run
    finish_by: float | None = None  # when admission planned its call to be answered by (admission.Seqs.due)
    priority: Priority = "online"  # batch runs only in the capacity online work leaves
    iterations: int = 0  # engine iterations it has run in (its prefill is the first)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.token_ids)

    @property
    def steps(self) -> int:
        return self.prepared.steps

    @property
    def kv_tokens(self) -> int:
        """Positions this sequence will occupy in the KV pool at its largest."""
        return self.prompt_tokens + self.steps + self.prepared.reserve

    @property
    def decode_iterations(self) -> int:
        """Iterations after its prefill, for a method whose sequences live on (o1: the thought, EOS and `<emb>`)."""
        return self.steps + self.prepared.reserve if self.steps else 0

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class EngineMethod(ABC):
    """One embedding method: what a forward pass computes for the sequences the engine picked."""

    #: whether sequences live on between iterations (False: all happens in their first pass)
    stateful: bool = True

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.prompts = PromptBuilder(loaded.spec, loaded.tokenizer, loaded.vocab_size)

    @property
    def runner_kind(self) -> str:
        """Which path computes the passes (`/info`): "hf", the model's own forward, unless a runner says otherwise."""
        return "hf"

    @abstractmethod
    def step(self, running: list[Sequence], admitted: list[Sequence]) -> None:
        """One forward pass: the next step of every running sequence (in slot order) and the
        first pass of newly admitted ones, which take the next slots in order. Sets `result` on
        sequences that are finished."""

    def remove(self, slot: int) -> None:  # noqa: B027 (stateless methods hold no slots)
        """Free a running sequence's slot (the last slot moves into it)."""

    def clear(self) -> None:  # noqa: B027
        """Drop all running sequences (after a failed pass)."""

    def finish(
        self, seq: Sequence, vector: torch.Tensor, steps: int | None = None, trajectory: torch.Tensor | None = None
    ) -> None:
        """`steps`: those that ran (default: the budget); `trajectory`: [steps, D] un-normalised
        embeddings after each step, kept only when the input asked for them."""
        if self.loaded.spec.normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        rows = None
        if seq.prepared.trajectory:
            if trajectory is None:
                trajectory = vector.new_zeros((0, vector.shape[-1]))
            elif self.loaded.spec.normalize:
                trajectory = torch.nn.functional.normalize(trajectory, dim=-1)
            rows = trajectory.float().cpu().numpy()
        seq.result = Embedded(vector.float().cpu().numpy(), seq.steps if steps is None else steps, rows)

    def combine(self, samples: list[Embedded]) -> Embedded:
        """One input's result from its samples' (o1 runs n thoughts): their mean, renormalised
        when the spec normalises (the direction is the research code's plain mean)."""
        if len(samples) == 1:
            return samples[0]
        mean = np.mean([s.vector for s in samples], axis=0, dtype=np.float64)
        if self.loaded.spec.normalize:
            mean /= np.linalg.norm(mean)
        return Embedded(mean.astype(np.float32), samples[0].steps)


class DecoderMethod(EngineMethod):
    """A method over a causal decoder whose sequences own slots of the runner's KV pool."""

    def __init__(self, loaded: LoadedModel, max_seqs: int) -> None:
        super().__init__(loaded)
        spec, family = loaded.spec, loaded.model.config.model_type
        self.runner: DecoderRunner | HFRunner
        self.packed = False  # whether the projections and LM head are packed for oneDNN
        if family in FAMILIES:
            self.packed = pack_for_serving(loaded)
            graphs = spec.cuda_graphs and loaded.device.type == "cuda"
            eager = spec.attn_implementation == "eager"
            self.runner = DecoderRunner(loaded.model, max_seqs, eager_attention=eager, cuda_graphs=graphs)
            how = f"{'packed' if self.packed else 'eager'} projections{', CUDA-graph decode steps' if graphs else ''}"
        else:
            self.runner, how = HFRunner(loaded.model), "the model's own forward"
        log.info("%s (%s): %s runs on the %s runner (%s)", spec.id, family, spec.method, self.runner.kind, how)
        self.embeddings = loaded.model.get_input_embeddings()

    @property
    def runner_kind(self) -> str:
        return self.runner.kind

    def prompt_embeddings(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        device = self.loaded.device
        return [self.embeddings(torch.tensor(s.prepared.token_ids, device=device)) for s in seqs]

    def remove(self, slot: int) -> None:
        self.runner.remove(slot)

    def clear(self) -> None:
        self.runner.clear()
