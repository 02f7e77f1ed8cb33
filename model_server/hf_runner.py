"""The fallback model runner: the model's own Hugging Face forward over one KV cache per sequence.

`DecoderRunner` re-implements the attention of the llama/mistral/qwen2/qwen3 layout so that a
batch of sequences shares one packed pass. Other families (MiniCPM3's multi-head latent attention,
and whatever the hub adds next) still serve the multi-step methods through this runner: same
interface, so the engine schedules and batches it alike, but each sequence runs its own forward over
its own `DynamicCache`. Correct first: every family's quirks (embedding and residual scaling, latent
KV, sliding windows) stay inside the family's own modules.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from model_server.hf_compat import cache_kwarg
from model_server.runner import lm_logits


class HFRunner:
    """Slots of per-sequence caches; `forward` steps running slots and adds new ones, `remove` frees one."""

    kind = "hf"

    def __init__(self, causal_lm: torch.nn.Module) -> None:
        self.lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        self.caches: list[DynamicCache] = []
        self.lengths: list[int] = []

    @property
    def size(self) -> int:
        return len(self.caches)

    def remove(self, slot: int) -> None:
        """Free `slot`; the last slot's sequence moves into it (callers mirror this swap)."""
        self.caches[slot], self.lengths[slot] = self.caches[-1], self.lengths[-1]
        self.caches.pop()
        self.lengths.pop()

    def clear(self) -> None:
        self.caches, self.lengths = [], []

    def _run(self, inputs: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
        """Final-layer states [n, H] of inputs [n, H] appended to a cache holding `start` positions."""
        positions = torch.arange(start, start + len(inputs), device=inputs.device)[None]
        return self.decoder(
            inputs_embeds=inputs[None], position_ids=positions, use_cache=True, **cache_kwarg(self.decoder, cache)
        ).last_hidden_state[0]

    @torch.inference_mode()
    def forward(
        self, decode_inputs: torch.Tensor | None, prompts: list[torch.Tensor], capacities: list[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """As `DecoderRunner.forward`: a decode step for every running slot (inputs in slot order),
        then the prefill of new prompts, which take the next slots. `capacities` is unused: caches grow."""
        n_dec = 0 if decode_inputs is None else len(decode_inputs)
        if n_dec != self.size:
            raise ValueError(f"decode inputs for {n_dec} sequences, {self.size} are running")
        decoded = None
        if n_dec:
            rows = zip(decode_inputs, self.caches, self.lengths, strict=True)
            decoded = torch.cat([self._run(x[None], cache, n) for x, cache, n in rows])
            self.lengths = [n + 1 for n in self.lengths]
        prefilled = []
        for prompt in prompts:
            cache = DynamicCache(config=self.lm.config)
            prefilled.append(self._run(prompt, cache, 0))
            self.caches.append(cache)
            self.lengths.append(len(prompt))
        return decoded, prefilled

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of selected rows only: callers gather the last positions first."""
        with torch.inference_mode():
            return lm_logits(self.lm, hidden)
