"""GIRCSE (arXiv 2509.24291): embedding by K soft-token refinement steps.

After the prompt's prefill, every step feeds the *soft token* e = softmax(logits_last / T) @ E
(E the input embedding matrix, softmax in fp32 or wider, no top-k) and keeps the step's final-layer
(post-norm) hidden state. The embedding is the L2-normalised mean of the K step states; the
prefill state is not pooled. K = 0 is defined here as mean pooling of the prompt's final states.
"""

from __future__ import annotations

import torch

from model_server.loading import LoadedModel
from model_server.methods.base import EngineMethod, Sequence
from model_server.runner import DecoderRunner


class GircseMethod(EngineMethod):
    def __init__(self, loaded: LoadedModel, max_seqs: int) -> None:
        super().__init__(loaded)
        self.runner = DecoderRunner(loaded.model, max_seqs)
        self.embeddings = loaded.model.get_input_embeddings()
        self.temperature = loaded.spec.soft_token_temperature
        # The running sum is fp32 at least (fp64 when the model is, for exactness tests).
        self.sum_dtype = torch.promote_types(loaded.dtype, torch.float32)

    def soft_tokens(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The soft-token step: final hidden states [N, H] -> next input embeddings [N, H]."""
        logits = self.runner.logits(last_hidden)
        probs = torch.softmax(logits.to(self.sum_dtype) / self.temperature, dim=-1)
        return probs.to(self.embeddings.weight.dtype) @ self.embeddings.weight

    @torch.inference_mode()
    def step(self, running: list[Sequence], admitted: list[Sequence]) -> None:
        device = self.loaded.device
        prompts = [self.embeddings(torch.tensor(s.prepared.token_ids, device=device)) for s in admitted]
        decoded, prefilled = self.runner.forward(
            torch.stack([s.pending for s in running]) if running else None,
            prompts,
            [s.kv_tokens for s in admitted],
        )
        # Rows that need a next soft token: one lm_head + softmax + @E for all of them together.
        need_next: list[tuple[Sequence, torch.Tensor]] = []
        for seq, states in zip(admitted, prefilled, strict=True):
            if seq.steps == 0:
                self.finish(seq, states.to(self.sum_dtype).mean(dim=0))
            else:
                seq.state_sum = torch.zeros(states.shape[-1], dtype=self.sum_dtype, device=device)
                need_next.append((seq, states[-1]))
        for seq, state in zip(running, decoded if decoded is not None else [], strict=True):
            seq.state_sum += state.to(self.sum_dtype)
            seq.steps_done += 1
            if seq.steps_done == seq.steps:
                self.finish(seq, seq.state_sum / seq.steps)  # no lm_head on the final step
            else:
                need_next.append((seq, state))
        if need_next:
            nexts = self.soft_tokens(torch.stack([state for _, state in need_next]))
            for (seq, _), nxt in zip(need_next, nexts, strict=True):
                seq.pending = nxt

    def remove(self, slot: int) -> None:
        self.runner.remove(slot)

    def clear(self) -> None:
        self.runner.clear()
