"""Ordinary embedding models: one forward pass, then mean / CLS / last-token pooling. K is 0."""

from __future__ import annotations

import torch

from model_server.methods.base import EngineMethod, Sequence


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool [B, T, H] states under a right-padded [B, T] mask into [B, H] (fp32 or wider)."""
    wide = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    if how == "cls":
        return wide[:, 0]
    if how == "last":
        return wide[torch.arange(len(wide)), mask.sum(dim=1) - 1]
    weights = mask.unsqueeze(-1).to(wide.dtype)
    return (wide * weights).sum(dim=1) / weights.sum(dim=1)


class PooledMethod(EngineMethod):
    stateful = False

    @torch.inference_mode()
    def step(self, running: list[Sequence], admitted: list[Sequence]) -> None:
        loaded, seqs = self.loaded, admitted
        width = max(s.prompt_tokens for s in seqs)
        pad = loaded.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = seq.prompt_tokens
            ids[row, :n] = torch.tensor(seq.prepared.token_ids)
            mask[row, :n] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        hidden = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for seq, vector in zip(seqs, pool(hidden, mask, loaded.spec.pooling), strict=True):
            self.finish(seq, vector)
