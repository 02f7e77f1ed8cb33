"""The runner interface: batched forward passes of a causal decoder over KV slots that the runner maps to ids.

A running sequence owns a *slot*; slots stay dense (0..n-1): a leaving sequence's slot is taken by the last one.
That swap happens here and nowhere else: `remove` moves the KV of the last slot (`_move`) and the rows of every
per-slot tensor a method keeps beside it (`rows`, gircse's next inputs and running sums), so a method indexes its
tensors by slot without mirroring the swap. Decode inputs come in slot order (`order`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from model_server.sequence import SeqId


def lm_logits(causal_lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head over final states as the family's own `forward` applies it: MiniCPM divides the
    states by hidden_size / dim_model_base first, Gemma 2 soft-caps the logits. Soft tokens and
    sampled thoughts must see the logits Hugging Face gives, whichever runner made the states."""
    config = causal_lm.config
    base = getattr(config, "dim_model_base", None)
    if base:
        hidden = hidden / (config.hidden_size / base)
    logits = causal_lm.get_output_embeddings()(hidden)
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass(frozen=True)
class Prefill:
    """A new sequence's prompt: its id, its input embeddings [n, H] and how many positions it will ever hold."""

    id: SeqId
    embeddings: torch.Tensor
    capacity: int


class Runner(ABC):
    """KV slots by sequence id; `forward` steps every running slot and prefills new ones, `remove` frees some."""

    #: which path computes the passes, as `/info` reports it
    kind: str

    def __init__(self, causal_lm: torch.nn.Module) -> None:
        self.lm = causal_lm
        self.packed = False  # whether the model's projections and LM head are packed for oneDNN (`packed`)
        self.order: list[SeqId] = []  # the running sequences in slot order
        self.slots: dict[SeqId, int] = {}
        #: per-slot tensors [size, ...] a method keeps beside the KV; their rows follow their slot on `remove`
        self.rows: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return len(self.order)

    @torch.inference_mode()
    def forward(
        self, decode_inputs: torch.Tensor | None, prefills: list[Prefill]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One pass: a decode step for every running slot, `decode_inputs` [size, H] in slot order (None when
        nothing runs), plus the prefill of `prefills`, which take the next slots in order. Returns the final-layer
        (post-norm) states: [size, H] for the decode rows and [n_i, H] per prompt."""
        n_dec = 0 if decode_inputs is None else len(decode_inputs)
        if n_dec != self.size:
            raise ValueError(f"decode inputs for {n_dec} sequences, {self.size} are running")
        out = self._forward(decode_inputs, [p.embeddings for p in prefills], [p.capacity for p in prefills])
        for p in prefills:
            self.slots[p.id] = len(self.order)
            self.order.append(p.id)
        return out

    @torch.inference_mode()
    def remove(self, ids: Iterable[SeqId]) -> None:
        """Free the slots of `ids` (unknown ids are ignored), highest slot first: the last slot moves into each."""
        for slot in sorted((self.slots.pop(i) for i in ids if i in self.slots), reverse=True):
            last = self.size - 1
            if slot != last:
                moved = self.order[last]
                self.order[slot], self.slots[moved] = moved, slot
                self._move(last, slot)
                for rows in self.rows.values():
                    rows[slot] = rows[last]
            self.order.pop()
            self._truncate(last)
            self.rows = {name: rows[:last] for name, rows in self.rows.items()}

    def clear(self) -> None:
        """Forget every slot (after a failed pass)."""
        self.order, self.slots, self.rows = [], {}, {}
        self._truncate(0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of selected rows only: callers gather the last positions first."""
        with torch.inference_mode():
            return lm_logits(self.lm, hidden)

    @abstractmethod
    def _forward(
        self, decode_inputs: torch.Tensor | None, prompts: list[torch.Tensor], capacities: list[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`forward` over the slots' KV, `prompts` [n_i, H] with `capacities` taking the next slots."""

    @abstractmethod
    def _move(self, source: int, target: int) -> None:
        """Copy slot `source`'s KV into slot `target`."""

    @abstractmethod
    def _truncate(self, size: int) -> None:
        """Keep the first `size` slots' KV."""
