"""DEBATER (arXiv 2502.12974): a document thinks through a chain of deliberation tokens.

A document is its body followed by the first K deliberation tokens `[CoD1]..[CoDK]` (K =
`refinement_steps`, 1..8; the prompt builder truncates the body, never them); its embedding is
the last deliberation token's final-layer (post-norm) state; the trajectory (every deliberation
token's state, for max-sim users) comes from the same pass. A query is `{instruction} {query}`
followed by EOS; its embedding is the EOS state. Both take a single forward pass: the research
model was trained so that the deliberation happens inside it, with no generation.
"""

from __future__ import annotations

import torch

from model_server.methods.base import DecoderMethod, Sequence


class DebaterMethod(DecoderMethod):
    @torch.inference_mode()
    def step(self, running: list[Sequence], admitted: list[Sequence]) -> None:
        # Every sequence finishes in its (packed, unpadded) prefill: nothing is ever running.
        _, prefilled = self.runner.forward(None, self.prompt_embeddings(admitted), [s.kv_tokens for s in admitted])
        for seq, states in zip(admitted, prefilled, strict=True):
            # The state of deliberation token i is what K = i would give (causal attention): the trajectory.
            self.finish(seq, states[-1], trajectory=states[len(states) - seq.steps :] if seq.steps else None)
