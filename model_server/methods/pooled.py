"""One-pass encoders through the model's own Hugging Face forward: ordinary embedding models (mean / CLS /
last-token pooling), cross-encoders and (methods/debater.py) DEBATER, so any architecture the installed
transformers (or a model repository's remote code) knows serves.

Their sequences finish in their first pass. A padded batch makes every row pay for the widest
one, so admitted inputs are sorted by length and split into groups whose padding stays small. Batches are then
padded a little more, to a multiple of `WIDTH_BUCKET` tokens and (past 4 rows) `ROW_BUCKET` rows: on the CPU,
oneDNN caches kernels and buffers per matmul shape (up to 1024 of them), and every new (rows, width) is a new
shape. Measured on a minilm-l6 worker over 150 batches of 1-128 random-length documents: +1068 MB of RSS with
exact shapes, +97 MB with buckets, at the same speed.

Decoders of the fast runner's families (llama, mistral, qwen2, qwen3) skip all of that: their prompts run packed
end to end through `runners.fast.DecoderRunner.encode` (no padding in the projections, no KV cache), their linear
layers packed once for oneDNN on the CPU. Other models run their own forward over padded batches; on the CPU
their linear layers are packed too (`model_server.runners.packed`, the spec's `linear`): minilm-l6, 8 batches of
8 × 48-word documents, 1.44× in bf16 and in fp32 (2-core AMX Xeon, alternating runs). Neither where the model runs
a repository's own code (`trust_remote_code`), which may read a linear layer's plain weight.
"""

from __future__ import annotations

from typing import Literal

import torch

from model_server.loading import LoadedModel
from model_server.methods.base import EngineMethod
from model_server.runners import DecoderRunner, fast_runner
from model_server.runners.fast import group_by_length
from model_server.runners.packed import pack_for_serving
from model_server.sequence import Embedded, Iteration, IterationResult, Joining, SeqId

WIDTH_BUCKET = 16
ROW_BUCKET = 8


def pool(states: torch.Tensor, how: str) -> torch.Tensor:
    """One sequence's vector (fp32 or wider) from the states [n, H] of its real positions."""
    wide = states.to(torch.promote_types(states.dtype, torch.float32))
    return wide[0] if how == "cls" else wide[-1] if how == "last" else wide.mean(dim=0)


def length_groups(join: list[Joining]) -> list[list[Joining]]:
    """Sequences grouped by length so that padding each group to its widest row costs little."""
    return [[join[i] for i in group] for group in group_by_length([j.input.prompt_tokens for j in join])]


class PooledMethod(EngineMethod):
    stateful = False
    #: right: an encoder's positions start at its first token; left (decoders pooled at their last token,
    #: as the research code pads): every row's last token sits at the end, with position ids from the mask
    padding_side: Literal["left", "right"] = "right"
    #: whether a decoder of the fast runner's families runs packed through it (a classifier's head reads padded rows)
    packs_prompts = True

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self.encoder: DecoderRunner | None = None
        if loaded.spec.trust_remote_code:
            return
        if self.packs_prompts:
            self.encoder = fast_runner(loaded, max_seqs=0)
        if self.encoder is None:
            pack_for_serving(loaded)

    @property
    def padded(self) -> bool:
        return self.encoder is None

    @property
    def runner_kind(self) -> str:
        return "hf" if self.encoder is None else self.encoder.kind

    @torch.inference_mode()
    def step(self, iteration: Iteration) -> IterationResult:
        """Every joining sequence finishes in this pass (nothing decodes, nothing is held)."""
        if self.encoder is not None:
            embed, device = self.loaded.model.get_input_embeddings(), self.loaded.device
            prompts = [embed(torch.tensor(j.input.token_ids, device=device)) for j in iteration.join]
            states = self.encoder.encode(prompts)
            return IterationResult({j.id: self._finish(j, s) for j, s in zip(iteration.join, states, strict=True)})
        finished: dict[SeqId, Embedded] = {}
        for group in length_groups(iteration.join):
            batch = self._padded(group)
            # `_finish_group` sees the group's own rows; the bucket's filler rows are dropped
            results = self._finish_group(group, self.loaded.model(**batch), batch["attention_mask"][: len(group)])
            finished.update(zip((j.id for j in group), results, strict=True))
        return IterationResult(finished)

    def _padded(self, seqs: list[Joining]) -> dict[str, torch.Tensor]:
        width = -(-max(s.input.prompt_tokens for s in seqs) // WIDTH_BUCKET) * WIDTH_BUCKET
        rows = len(seqs) if len(seqs) <= 4 else -(-len(seqs) // ROW_BUCKET) * ROW_BUCKET
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        mask[len(seqs) :, -1] = 1  # filler rows attend to one padding token: no row is all masked
        types = torch.zeros((rows, width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = seq.input.prompt_tokens
            span = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, span] = torch.tensor(seq.input.token_ids)
            mask[row, span] = 1
            if seq.input.token_type_ids is not None:
                types[row, span] = torch.tensor(seq.input.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(s.input.token_type_ids is not None for s in seqs):
            batch["token_type_ids"] = types
        if self.padding_side == "left":  # each row's positions count from its first real token
            batch["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return {k: v.to(self.loaded.device) for k, v in batch.items()}

    def _finish_group(self, seqs: list[Joining], output, mask: torch.Tensor) -> list[Embedded]:
        """The group's results, in its order."""
        states = output.last_hidden_state
        return [self._finish(seq, states[row][mask[row].bool()]) for row, seq in enumerate(seqs)]

    def _finish(self, seq: Joining, states: torch.Tensor) -> Embedded:
        """A sequence's result from the final states [n, H] of its real positions."""
        return self.embedded(pool(states, self.loaded.spec.pooling), seq.input.steps, seq.input.params.trajectory)


class CrossEncoderMethod(PooledMethod):
    """A sequence-classification model scoring (query, document) pairs: raw logits per pair."""

    packs_prompts = False

    def _finish_group(self, seqs: list[Joining], output, mask: torch.Tensor) -> list[Embedded]:
        return [
            self.embedded(logits, seq.input.steps, seq.input.params.trajectory)
            for seq, logits in zip(seqs, output.logits[: len(seqs)], strict=True)
        ]
