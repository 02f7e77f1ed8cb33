"""O1 Embedder (arXiv 2502.07555): think first, then embed.

A query `<query>{q}</query><thought>` is prefilled, then the model writes a thought of up to K
hard tokens (K = `refinement_steps`), sampled with the spec's temperature and top-p (0 = greedy);
EOS (unless the thought ended with one) and `<emb>` follow, and the embedding is `<emb>`'s
final-layer state. Each token is a decode step of the engine over the sequence's KV cache, so
the thought and the embedding pass continue from the prefill (no re-encode) and share passes
with every other request. The research code decodes the thought to text and re-tokenizes it;
feeding the sampled ids is the same sequence except where re-tokenization would merge tokens
differently. Documents (`text<emb>`) and K = 0 queries (`prompt EOS <emb>`) take one pass.

`n` thoughts per query are `n` sequences (the worker averages their vectors); sample i draws its
uniforms from `default_rng([seed, i])`, so a vector depends on the request's seed, never on what
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.methods.o1 import EMB_TOKEN
from model_server.loading import LoadedModel
from model_server.methods.base import DecoderMethod
from model_server.sequence import Embedded, Joining, SeqId

#: the thought sampler's seed when a request names none: the same request, the same vector
DEFAULT_SEED = 0
#: the candidates a row's nucleus is looked for in before its whole vocabulary is sorted
NUCLEUS_TOP_K = 64


@dataclass
class Thought:
    """A query's generation state between steps: what it sampled and what the next passes feed."""

    rng: np.random.Generator
    steps: int  # the budget K: thought tokens at most
    trajectory: bool  # whether the input asked for a trajectory
    tokens: list[int] = field(default_factory=list)  # sampled so far (a final EOS included)
    feed: list[int] = field(default_factory=list)  # inputs of the next passes, first one next
    sampling: bool = True  # whether a pass whose feed is done samples the next token


class O1Method(DecoderMethod[Thought]):
    def __init__(self, loaded: LoadedModel, max_seqs: int) -> None:
        super().__init__(loaded, max_seqs)
        spec, tokenizer = loaded.spec, loaded.tokenizer
        self.temperature, self.top_p = spec.thought_temperature, spec.thought_top_p
        self.eos = tokenizer.eos_token_id
        self.emb = tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        self.wide = torch.promote_types(loaded.dtype, torch.float32)  # softmax in fp32 or wider

    @torch.inference_mode()
    def _pass(self, join: list[Joining]) -> dict[SeqId, Embedded]:
        running = list(self.runner.order)
        inputs = None
        if running:
            feed = [self.states[i].feed.pop(0) for i in running]
            inputs = self.embeddings(torch.tensor(feed, device=self.loaded.device))
        decoded, prefilled = self.runner.forward(inputs, self.prompt_embeddings(join))
        finished: dict[SeqId, Embedded] = {}
        # Rows whose next token is sampled: one lm_head over all of them together.
        to_sample: list[tuple[Thought, torch.Tensor]] = []
        for j, states in zip(join, prefilled, strict=True):
            params = j.input.params
            if j.input.steps == 0:  # a document or K = 0: the prompt already ends with <emb>
                finished[j.id] = self.embedded(states[-1], 0, params.trajectory)
            else:
                seed = DEFAULT_SEED if params.seed is None else params.seed
                rng = np.random.default_rng([seed, params.sample])
                thought = self.states[j.id] = Thought(rng, j.input.steps, params.trajectory)
                to_sample.append((thought, states[-1]))
        for seq, state in zip(running, decoded if decoded is not None else [], strict=True):
            thought = self.states[seq]
            if thought.feed:
                continue  # EOS or <emb> is next: no logits needed
            if thought.sampling:
                to_sample.append((thought, state))
            else:
                finished[seq] = self.embedded(state, thought.steps, thought.trajectory)  # the state of <emb>
        if to_sample:
            states = torch.stack([state for _, state in to_sample])
            tokens = self.sample(states, [thought.rng for thought, _ in to_sample])
            for (thought, _), token in zip(to_sample, tokens, strict=True):
                self._append(thought, token)
        return finished

    def _append(self, thought: Thought, token: int) -> None:
        """Feed a sampled token next; close the thought at EOS or at K tokens."""
        thought.tokens.append(token)
        thought.feed.append(token)
        if token == self.eos or len(thought.tokens) == thought.steps:
            thought.sampling = False
            thought.feed.extend([self.emb] if token == self.eos else [self.eos, self.emb])

    def sample(self, hidden: torch.Tensor, rngs: list[np.random.Generator]) -> list[int]:
        """Next tokens of rows [N, H]: greedy at temperature 0, else `nucleus_sample` with one uniform per
        row from its own rng. The one host sync of a step: the tokens decide what each sequence feeds next."""
        logits = self.runner.logits(hidden)
        if self.temperature == 0:  # widening is exact, so the argmax is the same without it
            return greedy(logits)
        logits = logits.to(self.wide)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        draws = torch.tensor([rng.random() for rng in rngs], dtype=probs.dtype).to(probs.device, non_blocking=True)
        return nucleus_sample(probs, self.top_p, draws)


def greedy(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token, the first one where several tie (as `argmax` and `generate` pick it).
    `max` finds the same index as `argmax` but vectorises over bf16 on the CPU where `argmax` does not: [16, 49,152]
    in 0.27 against 1.27 ms on the 2-core Xeon, 3 % of a 16-row decode step."""
    return logits.max(dim=-1).indices.tolist()


def nucleus_sample(probs: torch.Tensor, top_p: float, draws: torch.Tensor, top_k: int = NUCLEUS_TOP_K) -> list[int]:
    """Tokens drawn from rows of probabilities [N, V] by inverse CDF over the nucleus, with uniforms `draws`
    [N] in [0, 1). The nucleus: the most likely tokens (ties in token order) until their mass reaches `top_p`,
    at least one. Each row first looks among its `top_k` most likely tokens, which decide it exactly when the
    nucleus ends inside them and no token left out ties with one kept; only the other rows sort the whole
    vocabulary. Either way the token is the one sorting the whole row (stably) gives. One host sync, two when
    a row needs the whole vocabulary."""
    vocab = probs.shape[-1]
    tokens, fits = _invert_cdf(*_descending(*probs.topk(min(top_k, vocab), dim=-1)), top_p, draws)
    if top_k >= vocab:
        return tokens.tolist()
    picked = torch.where(fits, tokens, -1).tolist()
    flat = [row for row, token in enumerate(picked) if token < 0]  # flat rows (a high temperature)
    if flat:
        rows = torch.tensor(flat, device=probs.device)
        values, index = probs[rows].sort(dim=-1, descending=True, stable=True)
        for row, token in zip(flat, _invert_cdf(values, index, top_p, draws[rows])[0].tolist(), strict=True):
            picked[row] = token
    return picked


def _descending(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates [N, C] re-ordered by descending value, equal values by token id (`topk` leaves ties unordered)."""
    index, by_id = index.sort(dim=-1)
    values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, index.gather(-1, by_value)


def _invert_cdf(
    values: torch.Tensor, index: torch.Tensor, top_p: float, draws: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Over candidates [N, C] in descending order: the drawn token of each row, and whether the row's nucleus
    is decided by these candidates (it ends before the last one, which no kept token ties with)."""
    inside = values.cumsum(dim=-1) - values < top_p  # a prefix of each row: the nucleus among the candidates
    kept = torch.where(inside, values, 0).cumsum(dim=-1)
    last = inside.sum(dim=-1, keepdim=True) - 1  # the last kept candidate
    position = torch.searchsorted(kept, draws[:, None] * kept[:, -1:], right=True)
    tokens = index.gather(-1, torch.minimum(position, last)).squeeze(-1)
    # Past the nucleus a candidate is left; none left out can tie with a kept one (it would sort among them).
    return tokens, values.gather(-1, last)[:, 0] > values[:, -1]
