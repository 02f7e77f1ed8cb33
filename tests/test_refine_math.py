"""The refinement math against torch autograd (the oracle), and its properties: direction, determinism, sampling."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.refine.api import Optimization
from service.refine.optimizer import OptimConfig, cosines, refine, sample_indices, teacher_distribution, unit_rows

CONFIGS = [
    OptimConfig(),
    Optimization(normalize="minmax").config(),
    OptimConfig(steps=50, lr=3e-3, teacher_temperature=0.5, student_temperature=0.05),
]


def autograd_refine(query: np.ndarray, docs: np.ndarray, scores: np.ndarray, config: OptimConfig):
    """The paper's loop written with torch.optim.Adam and autograd, in float64."""
    w = torch.tensor(query, dtype=torch.float64).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=config.lr)
    d = torch.tensor(docs, dtype=torch.float64)
    s = torch.tensor(scores, dtype=torch.float64)
    if config.normalize == "minmax":
        s = (s - s.min()) / (s.max() - s.min() + 1e-8)
    p = (s / config.teacher_temperature).softmax(-1)

    def loss_at(vector: torch.Tensor) -> torch.Tensor:
        c = F.cosine_similarity(d, vector)
        if config.normalize == "minmax":
            c = (c - c.min()) / (c.max() - c.min() + 1e-8)
        q = (c / config.student_temperature).softmax(-1)
        return torch.sum(p * torch.log((p + 1e-8) / (q + 1e-8)))

    losses = []
    for _ in range(config.steps):
        loss = loss_at(w)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return w.detach().numpy(), losses, loss_at(w.detach()).item()


def problem(seed: int = 0, n: int = 20, d: int = 576):
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n, d))
    query = docs[:5].mean(axis=0) + rng.normal(size=d)
    return query / np.linalg.norm(query), docs, rng.uniform(size=n)


@pytest.mark.parametrize("config", CONFIGS, ids=["paper", "minmax", "temperatures"])
def test_closed_form_matches_autograd(config):
    query, docs, scores = problem()
    ours = refine(query, docs, scores, config)
    vector, losses, loss_after = autograd_refine(query, docs, scores, config)
    np.testing.assert_allclose(ours.vector, vector, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.losses, losses, rtol=1e-10, atol=1e-14)
    assert ours.loss_after == pytest.approx(loss_after, rel=1e-10)
    assert ours.loss_after < ours.losses[0]


def test_labels_move_positives_up():
    """A constructed case: the two labelled documents start in the middle of the ranking and end on top."""
    rng = np.random.default_rng(1)
    d = 64
    query = rng.normal(size=d)
    docs = rng.normal(size=(12, d)) + 0.3 * query
    before = np.argsort(-cosines(unit_rows(docs), query))
    positives = [int(before[5]), int(before[8])]  # ranked 6th and 9th
    labels = np.zeros(12)
    labels[positives] = 1
    refined = refine(query, docs, labels, OptimConfig(lr=1e-2, teacher_temperature=0.1, student_temperature=0.1))
    after = np.argsort(-cosines(unit_rows(docs), refined.vector))
    assert set(after[:2]) == set(positives)
    # With the paper's small default step the direction is the same, only shorter.
    small = refine(query, docs, labels, OptimConfig())
    ranks = lambda v: np.argsort(np.argsort(-cosines(unit_rows(docs), v)))  # noqa: E731
    assert all(ranks(small.vector)[positives] <= ranks(query)[positives])
    assert small.loss_after < small.losses[0]


def test_deterministic():
    query, docs, scores = problem(2)
    a = refine(query, docs, scores, OptimConfig())
    b = refine(query.copy(), docs.copy(), scores.copy(), OptimConfig())
    assert np.array_equal(a.vector, b.vector) and a.losses == b.losses
    assert sample_indices(scores, 10, 4, seed=7) == sample_indices(scores, 10, 4, seed=7)


def test_no_renormalisation_between_steps():
    query, docs, scores = problem(3)
    refined = refine(3 * query, docs, scores, OptimConfig(lr=1e-2))
    assert abs(np.linalg.norm(refined.vector) - 3) > 1e-3  # Adam moved it; nothing pulled it back to norm 3 or 1


def test_sampling_takes_the_top_then_seeded_random_rest():
    sims = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.0, 0.4, 0.6])
    picked = sample_indices(sims, total=6, from_top=3, seed=42)
    order = list(np.argsort(-sims, kind="stable"))
    assert picked[:3] == [1, 6, 3]
    rest = random.Random(42).sample(range(3, 10), k=3)  # the paper's draw, over positions in the ranking
    assert picked[3:] == [order[i] for i in rest]
    assert sample_indices(sims, total=20, from_top=20, seed=0) == order  # fewer candidates than asked: all
    assert sample_indices(sims, total=4, from_top=0, seed=1) != sample_indices(sims, total=4, from_top=0, seed=2)


def test_minmax_normalisation_and_preset():
    p = teacher_distribution(np.array([10.0, 12.0, 14.0]), OptimConfig(normalize="minmax", teacher_temperature=2))
    expected = np.exp(np.array([0, 0.5, 1.0]) / 2)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-7)
    # Shifting or scaling the teacher's scores changes nothing under minmax.
    shifted = teacher_distribution(np.array([1.0, 1.2, 1.4]), OptimConfig(normalize="minmax", teacher_temperature=2))
    np.testing.assert_allclose(p, shifted, rtol=1e-6)
    preset = Optimization(normalize="minmax")
    assert (preset.lr, preset.teacher_temperature, preset.student_temperature) == (5e-3, 2.0, 1.0)
    assert Optimization(normalize="minmax", lr=1e-3).lr == 1e-3  # explicit values win over the preset
    assert Optimization().lr == 1e-4 and Optimization().teacher_temperature == 1.0


@pytest.mark.solo  # a time budget
def test_fast_enough():
    """The issue's budget is 10 ms per query (100 steps, 20 documents, d=576); CI machines vary, so allow 3×."""
    query, docs, scores = problem(4)
    refine(query, docs, scores, OptimConfig())
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        refine(query, docs, scores, OptimConfig())
        best = min(best, time.perf_counter() - started)
    assert best < 0.030, f"{best * 1000:.1f} ms"
