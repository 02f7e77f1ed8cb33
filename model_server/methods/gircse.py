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
    def prefill(self, seqs: list[Sequence]) -> None:
        device = self.loaded.device
        prompts = [self.embeddings(torch.tensor(s.prepared.token_ids, device=device)) for s in seqs]
        states = self.runner.prefill(prompts, [s.kv_tokens for s in seqs])
        refining = [i for i, s in enumerate(seqs) if s.steps > 0]
        for seq, state in zip(seqs, states, strict=True):
            if seq.steps == 0:
                self.finish(seq, state.to(self.sum_dtype).mean(dim=0))
        if refining:
            nexts = self.soft_tokens(torch.stack([states[i][-1] for i in refining]))
            for row, i in enumerate(refining):
                seqs[i].pending = nexts[row]
                seqs[i].state_sum = torch.zeros(nexts.shape[-1], dtype=self.sum_dtype, device=device)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> None:
        hidden = self.runner.decode(torch.stack([s.pending for s in seqs]))
        going_on = []
        for row, seq in enumerate(seqs):
            seq.state_sum += hidden[row].to(self.sum_dtype)
            seq.steps_done += 1
            if seq.steps_done == seq.steps:
                self.finish(seq, seq.state_sum / seq.steps)  # no lm_head on the final step
            else:
                going_on.append(row)
        if going_on:
            nexts = self.soft_tokens(hidden[going_on])
            for row, nxt in zip(going_on, nexts, strict=True):
                seqs[row].pending = nxt

    def remove(self, slot: int) -> None:
        self.runner.remove(slot)

    def clear(self) -> None:
        self.runner.clear()
