"""o1's nucleus sampler looks among the top 64 tokens first: it must draw exactly what sorting the whole
vocabulary draws, peaked rows and flat ones, ties at the cut included. Greedy thoughts take each row's first
most likely token, as `argmax` does."""

from __future__ import annotations

import pytest
import torch

from model_server.methods.o1 import NUCLEUS_TOP_K, greedy, nucleus_sample

VOCAB = 49152


def full_sort_sample(probs: torch.Tensor, top_p: float, draws: torch.Tensor) -> list[int]:
    """The definition, row by row: sort the whole row (descending, ties in token order), keep tokens while
    the mass before them is below top_p, walk the kept mass to the draw."""
    tokens = []
    for row, draw in zip(probs, draws.tolist(), strict=True):
        values, order = row.sort(descending=True, stable=True)
        before = values.cumsum(0) - values
        kept = values[before < top_p].cumsum(0)
        index = int(torch.searchsorted(kept, draw * kept[-1], right=True))
        tokens.append(int(order[min(index, len(kept) - 1)]))
    return tokens


def _probs(rows: int, temperature: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Logits rounded through bf16, as a bf16 model's are: many exactly equal probabilities.
    logits = (torch.randn(rows, VOCAB, generator=generator) * 4).to(torch.bfloat16).float()
    return torch.softmax(logits / temperature, dim=-1)


def _draws(rows: int, seed: int) -> torch.Tensor:
    draws = torch.rand(rows, generator=torch.Generator().manual_seed(seed))
    draws[0], draws[-1] = 0.0, 1 - 2**-24  # the ends of [0, 1)
    return draws


def _fits(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Rows whose nucleus the top-k decides (the sampler's shortcut), by the definition's sort."""
    values = probs.sort(dim=-1, descending=True).values
    size = ((values.cumsum(-1) - values) < top_p).sum(-1)
    return (size < NUCLEUS_TOP_K) & (values[:, NUCLEUS_TOP_K - 1] < values.gather(-1, size[:, None] - 1)[:, 0])


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.1, 0.3, 1.0])
def test_equals_the_full_sort(temperature, top_p):
    probs, draws = _probs(48, temperature, seed=7), _draws(48, seed=8)
    assert nucleus_sample(probs, top_p, draws) == full_sort_sample(probs, top_p, draws)


def test_both_paths_are_taken():
    # Peaked rows (temperature 0.1) fit in the top 64; flat ones (temperature 1) need the whole vocabulary.
    probs = torch.cat([_probs(8, 0.1, seed=1), _probs(8, 1.0, seed=2)])
    fits = _fits(probs, 0.9)
    assert fits[:8].all() and not fits[8:].any()
    draws = _draws(16, seed=3)
    assert nucleus_sample(probs, 0.9, draws) == full_sort_sample(probs, 0.9, draws)


def test_ties_across_the_cut_sort_in_token_order():
    # 100 equally likely tokens hold almost all the mass, at ids that topk need not pick in order.
    probs = torch.full((4, VOCAB), 1e-9)
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:100]
    probs[:, ids] = 1.0
    probs[1, ids[:3]] = 2.0  # row 1: three ahead, then the tie
    probs /= probs.sum(dim=-1, keepdim=True)
    draws = torch.tensor([0.0, 0.3, 0.7, 1 - 2**-24])
    for top_p in (0.05, 0.5, 0.95):
        assert nucleus_sample(probs, top_p, draws) == full_sort_sample(probs, top_p, draws)


def test_small_vocabulary_and_float64():
    probs = torch.softmax(torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), -1)
    draws = _draws(6, seed=5).double()
    assert nucleus_sample(probs, 0.9, draws) == full_sort_sample(probs, 0.9, draws)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_greedy_is_argmax_and_takes_the_first_of_tied_tokens(dtype):
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(16, VOCAB, generator=generator) * 4).to(dtype)
    # Rows 0-3: the maximum at several ids, the first of them at the start, middle and end of the row.
    for row, ids in enumerate(([0, 5, VOCAB - 1], [777, 30000], [30000, VOCAB - 1], list(range(40000, 40100)))):
        logits[row, ids] = 100.0
    want = [int(row.double().numpy().argmax()) for row in logits]  # numpy: the first maximum, by definition
    assert want[:4] == [0, 777, 30000, 40000]
    assert greedy(logits) == want == logits.argmax(dim=-1).tolist()
