"""GIRCSE (arXiv 2509.24291): embedding by K soft-token refinement steps.

After the prompt's prefill, every step feeds the *soft token* e = softmax(logits_last / T) @ E
(E the input embedding matrix, softmax in fp32 or wider, no top-k) and keeps the step's final-layer
(post-norm) hidden state. The embedding is the L2-normalised mean of the K step states; the
prefill state is not pooled. K = 0 is defined here as mean pooling of the prompt's final states.

With a tolerance (`refinement_steps: "auto"`) a sequence leaves the batch after step i >= 2 once
1 - cos(embedding after i, after i - 1) < tolerance; the budget K bounds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_server.loading import LoadedModel
from model_server.methods.base import DecoderMethod
from model_server.runners import lm_logits
from model_server.runners.packed import PackedLinear, own_gemm
from model_server.sequence import Embedded, Joining, SeqId


def soft_tokens(
    causal_lm: torch.nn.Module,
    last_hidden: torch.Tensor,
    temperature: float,
    mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The soft-token step, shared by serving and the ICR trainer so the two cannot drift: final
    hidden states [N, H] -> next input embeddings [N, H]. E is the raw input matrix (MiniCPM's
    embedding scale not applied, as in the reference's `softmax @ weight`). The softmax runs in
    fp32, or wider when the logits are (fp64 exactness tests); the LM head sees only the rows given.
    `mix` computes `probs @ E` where serving has it faster (E packed for oneDNN); default: the matmul."""
    logits = lm_logits(causal_lm, last_hidden)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    weight = causal_lm.get_input_embeddings().weight
    probs = probs.to(weight.dtype)
    return mix(probs) if mix is not None else probs @ weight


@dataclass
class Refinement:
    """A sequence's soft-token state between steps; its running sum and next input are rows of the runner's
    per-slot tensors (`runner.rows`)."""

    steps: int  # the budget K
    tolerance: float | None  # `refinement_steps: "auto"`: leave once a step moves the embedding by less (1 - cos)
    trajectory: list[torch.Tensor] | None  # embeddings after each step so far, when asked for
    steps_done: int = 0


class GircseMethod(DecoderMethod[Refinement]):
    """Per slot, as rows of the runner's per-slot tensors (which follow their slot when one is freed): the next
    input embedding ("pending") and the running sum of step states ("totals"), so a step feeds and accumulates
    without gathering per-sequence rows."""

    def __init__(self, loaded: LoadedModel, max_seqs: int) -> None:
        super().__init__(loaded, max_seqs)
        self.temperature = loaded.spec.soft_token_temperature
        # The running sum is fp32 at least (fp64 when the model is, for exactness tests).
        self.sum_dtype = torch.promote_types(loaded.dtype, torch.float32)
        # Where the projections are packed, `probs @ E` is too, as a linear layer V -> H over E's transpose (a copy
        # of E: 113 MB for SmolLM2 in fp32), where that measured faster than the matmul: bf16 on oneDNN, 1.2-1.7x
        # at 1 thread; anything on genembed's GEMM, fp32 2.1x / 2.2x / 1.3x at 1 / 16 / 64 rows (2-core AVX2 EPYC).
        # oneDNN's fp32 ran it at 0.78-1.02x, so there fp32 keeps the matmul.
        gemm = own_gemm(loaded.spec)
        packs = self.runner.packed and (loaded.dtype == torch.bfloat16 or gemm is not None)
        self.mix = PackedLinear(self.embeddings.weight.t().contiguous(), gemm=gemm) if packs else None

    @torch.inference_mode()
    def _pass(self, join: list[Joining]) -> dict[SeqId, Embedded]:
        runner = self.runner
        running = list(runner.order)
        n = len(running)
        decoded, prefilled = runner.forward(runner.rows["pending"] if n else None, self.prompt_embeddings(join))
        weight = self.embeddings.weight
        hidden_size = weight.shape[-1]
        totals = runner.rows["totals"] if n else weight.new_zeros((0, hidden_size), dtype=self.sum_dtype)
        finished: dict[SeqId, Embedded] = {}
        # Slots whose next soft token is needed, and their states: one lm_head + softmax + @E for all together.
        slots: list[int] = []
        states: list[torch.Tensor] = []
        if n:
            refinements = [self.states[i] for i in running]
            sums = totals + decoded.to(self.sum_dtype)
            drifts = self._drifts(refinements, sums, totals)
            totals = sums
            for slot, (seq, r, drift) in enumerate(zip(running, refinements, drifts, strict=True)):
                r.steps_done += 1
                if r.trajectory is not None:
                    r.trajectory.append(sums[slot] / r.steps_done)
                if r.steps_done == r.steps or drift < (r.tolerance or 0):
                    trajectory = torch.stack(r.trajectory) if r.trajectory is not None else None
                    # no lm_head on the final step
                    vector = sums[slot] / r.steps_done
                    finished[seq] = self.embedded(vector, r.steps_done, r.trajectory is not None, trajectory)
                else:
                    slots.append(slot)
            if slots:
                states.append(decoded[slots] if len(slots) < n else decoded)
        for slot, (j, hidden) in enumerate(zip(join, prefilled, strict=True), start=n):
            params = j.input.params
            if j.input.steps == 0:
                finished[j.id] = self.embedded(hidden.to(self.sum_dtype).mean(dim=0), 0, params.trajectory)
            else:
                self.states[j.id] = Refinement(j.input.steps, params.tolerance, [] if params.trajectory else None)
                slots.append(slot)
                states.append(hidden[-1:])
        totals = torch.cat([totals, totals.new_zeros((len(join), hidden_size))])
        nexts = soft_tokens(self.loaded.model, torch.cat(states), self.temperature, self.mix) if slots else None
        if nexts is not None and len(slots) == n + len(join):
            pending = nexts
        else:  # finished slots keep a zero row until `_forget` frees them
            pending = weight.new_zeros((n + len(join), hidden_size))
            if nexts is not None:
                pending[slots] = nexts
        runner.rows["pending"], runner.rows["totals"] = pending, totals
        return finished

    @staticmethod
    def _drifts(refinements: list[Refinement], sums: torch.Tensor, previous: torch.Tensor) -> list[float]:
        """Per running sequence, 1 - cos between its embedding after this step and after the one before
        (`refinement_steps: "auto"`, clamped at 0 so a tolerance of 0 runs every step); infinite where no
        tolerance is set, and on the first step, which has no step before it."""
        if all(r.tolerance is None for r in refinements):
            return [math.inf] * len(refinements)
        drift = (1 - torch.nn.functional.cosine_similarity(sums, previous, dim=-1)).clamp_min(0)
        return [
            d if r.steps_done > 0 and r.tolerance is not None else math.inf
            for r, d in zip(refinements, drift.tolist(), strict=True)
        ]
