"""The fallback model runner: the model's own Hugging Face forward over one KV cache per sequence.

`fast.DecoderRunner` re-implements the attention of the llama/mistral/qwen2/qwen3 layout so that a
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
from model_server.runners.base import Runner


class HFRunner(Runner):
    """A `DynamicCache` per slot."""

    kind = "hf"

    def __init__(self, causal_lm: torch.nn.Module) -> None:
        super().__init__(causal_lm)
        self.decoder = causal_lm.get_decoder()
        self.caches: list[DynamicCache] = []
        self.lengths: list[int] = []

    def _move(self, source: int, target: int) -> None:
        self.caches[target], self.lengths[target] = self.caches[source], self.lengths[source]

    def _truncate(self, size: int) -> None:
        self.caches, self.lengths = self.caches[:size], self.lengths[:size]

    def _run(self, inputs: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
        """Final-layer states [n, H] of inputs [n, H] appended to a cache holding `start` positions."""
        positions = torch.arange(start, start + len(inputs), device=inputs.device)[None]
        return self.decoder(
            inputs_embeds=inputs[None], position_ids=positions, use_cache=True, **cache_kwarg(self.decoder, cache)
        ).last_hidden_state[0]

    def _forward(
        self, decode_inputs: torch.Tensor | None, prompts: list[torch.Tensor], capacities: list[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Each sequence through the model's own forward over its own cache; `capacities` is unused: caches grow."""
        n_dec = 0 if decode_inputs is None else len(decode_inputs)
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
