"""Batched forward passes of a Llama-family decoder over a slot-based KV cache (the model runner).

Why not `model(..., past_key_values=...)`: continuous batching needs sequences of different
lengths to join and leave a batch every iteration. Here each running sequence owns a *slot* (a
row of a preallocated KV tensor per layer); slots stay dense (0..n-1, a leaving sequence is
replaced by the last one) so a decode step attends over a view of the pool with no copies.
Prefill packs the new prompts end to end, so projections and MLPs never see padding.

The weights are Hugging Face's own modules (projections, norms, MLP, rotary embedding); only
the batching around them lives here. Supports llama, mistral, qwen2 and qwen3 layouts.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [..., tokens, heads, head_dim] with cos/sin of [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class DecoderRunner:
    """Owns the KV pool; `prefill` adds sequences, `decode` steps all of them, `remove` frees one."""

    def __init__(self, causal_lm: torch.nn.Module, max_seqs: int, eager_attention: bool = False) -> None:
        self.lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        config = causal_lm.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_seqs = max_seqs
        weight = causal_lm.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self._kernel = sdpa_kernel(SDPBackend.MATH) if eager_attention else contextlib.nullcontext()
        n_layers = len(self.decoder.layers)
        self.keys: list[torch.Tensor] = [self._empty(0, 0)] * n_layers
        self.values: list[torch.Tensor] = [self._empty(0, 0)] * n_layers
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    # -- pool bookkeeping ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.lengths)

    def _empty(self, rows: int, cap: int) -> torch.Tensor:
        return torch.zeros(rows, self.n_kv, cap, self.head_dim, dtype=self.dtype, device=self.device)

    def _reserve(self, rows: int, cap: int) -> None:
        """Grow the pool (doubling) so it holds `rows` slots of `cap` positions."""
        have_rows, have_cap = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= have_rows and cap <= have_cap:
            return
        new_rows = min(max(rows, 2 * have_rows), max(self.max_seqs, rows))
        new_cap = max(cap, have_cap if cap <= have_cap else 2 * have_cap)
        used = self.size
        for pool in (self.keys, self.values):
            for i, old in enumerate(pool):
                grown = self._empty(new_rows, new_cap)
                grown[:used, :, :have_cap] = old[:used]
                pool[i] = grown

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Free `slot`; the last slot's sequence moves into it (callers mirror this swap)."""
        last = self.size - 1
        if slot != last:
            n = int(self.lengths[last])
            for pool in (self.keys, self.values):
                for layer in pool:
                    layer[slot, :, :n] = layer[last, :, :n]
            self.lengths[slot] = self.lengths[last]
        self.lengths = self.lengths[:last]

    def clear(self) -> None:
        self.lengths = self.lengths[:0]

    # -- forward passes -------------------------------------------------------------------------

    def _project(self, attn, x: torch.Tensor, positions: torch.Tensor):
        """q, k, v for tokens x [T, H] at `positions` [T], rotary applied: [T, heads, head_dim]."""
        t = x.shape[0]
        q = attn.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = attn.v_proj(x).view(t, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.decoder.rotary_emb(x[None], positions[None])
        return _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0]), v

    def _layers(self, hidden: torch.Tensor, attend) -> torch.Tensor:
        for index, layer in enumerate(self.decoder.layers):
            residual = hidden
            attn_out = attend(index, layer.self_attn, layer.input_layernorm(hidden))
            hidden = residual + layer.self_attn.o_proj(attn_out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.decoder.norm(hidden)

    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], capacities: list[int]) -> list[torch.Tensor]:
        """Run new sequences' prompts (input embeddings [n_i, H]) and give each a slot.

        `capacities[i]` is how many positions sequence i will ever hold. Returns each prompt's
        final-layer (post-norm) hidden states [n_i, H]. Slots are assigned in order after the
        existing ones.
        """
        first = self.size
        lengths = [p.shape[0] for p in prompts]
        self._reserve(first + len(prompts), max(capacities))
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()

        def attend(index: int, attn, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._project(attn, x, positions)
            out = torch.empty_like(q)
            for i, (a, b) in enumerate(itertools.pairwise(bounds)):
                self.keys[index][first + i, :, : b - a] = k[a:b].transpose(0, 1)
                self.values[index][first + i, :, : b - a] = v[a:b].transpose(0, 1)
                qi = q[a:b].transpose(0, 1)[None]
                ki = k[a:b].transpose(0, 1).repeat_interleave(self.n_heads // self.n_kv, dim=0)[None]
                vi = v[a:b].transpose(0, 1).repeat_interleave(self.n_heads // self.n_kv, dim=0)[None]
                with self._kernel:
                    out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1)
            return out.reshape(x.shape[0], -1)

        hidden = self._layers(torch.cat(prompts), attend)
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, device=self.device)])
        return list(hidden.split(lengths))

    @torch.inference_mode()
    def decode(self, inputs: torch.Tensor) -> torch.Tensor:
        """One step for every slot: inputs [n_slots, H] (slot order) -> final hidden [n_slots, H]."""
        n = self.size
        positions = self.lengths.clone()
        span = int(positions.max()) + 1
        rows = torch.arange(n, device=self.device)
        # Grouped-query attention without repeating K/V: a kv head's query heads form the query axis.
        visible = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        group = self.n_heads // self.n_kv

        def attend(index: int, attn, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._project(attn, x, positions)
            keys, values = self.keys[index], self.values[index]
            keys[rows, :, positions] = k
            values[rows, :, positions] = v
            q = q.view(n, self.n_kv, group, self.head_dim)
            with self._kernel:
                out = F.scaled_dot_product_attention(q, keys[:n, :, :span], values[:n, :, :span], attn_mask=visible)
            return out.reshape(n, -1)

        hidden = self._layers(inputs, attend)
        self.lengths = positions + 1
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of selected rows only: callers gather the last positions first."""
        with torch.inference_mode():
            return self.lm.get_output_embeddings()(hidden)
