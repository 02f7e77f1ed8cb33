"""The refinement math of Gera et al. (arXiv 2605.12487): seeded sampling, then Adam on KL(p‖q) for one query vector.

p = softmax(teacher scores / T_t) over the sampled documents, q = softmax(cos(w, d_i) / T_s). Adam moves a copy
of the query vector w; it is *not* renormalised between steps (the cosine normalises inside the loss, as in the
paper's code). `minmax` is the ReFIT baseline: min-max scaling of the teacher scores once and of the student
cosines at every step.

The gradient is closed-form numpy in float64 (about 20 small array operations a step, no autograd graph), so
100 steps over 20 documents take a few milliseconds; the tests check it against torch autograd.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np

Normalize = Literal["none", "minmax"]

# torch.optim.Adam's defaults and the epsilons of the paper's code, so results match it.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
KL_EPS = 1e-8
MINMAX_EPS = 1e-8
COSINE_EPS = 1e-8


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 100
    lr: float = 1e-4
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    normalize: Normalize = "none"


@dataclass(frozen=True)
class Refined:
    vector: np.ndarray  # float64, the query after `steps` Adam updates (not normalised)
    losses: list[float]  # loss before each update; losses[0] is the loss of the start vector
    loss_after: float  # loss of the returned vector


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (zero rows stay zero): cosines become dot products."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, COSINE_EPS)


def cosines(unit_docs: np.ndarray, query: np.ndarray) -> np.ndarray:
    """cos(query, d_i) for documents already scaled by `unit_rows`."""
    query = np.asarray(query, dtype=np.float64)
    return unit_docs @ query / max(float(np.linalg.norm(query)), COSINE_EPS)


def sample_indices(similarities: np.ndarray, total: int, from_top: int, seed: int) -> list[int]:
    """The paper's sample: the `from_top` most similar documents plus `total - from_top` drawn at random (seeded)
    from the rest. Indices refer to `similarities`; with fewer candidates than `total`, all of them."""
    order = np.argsort(-np.asarray(similarities), kind="stable")
    top = min(from_top, len(order))
    rest = min(total - from_top, len(order) - top)
    picked = random.Random(seed).sample(range(top, len(order)), k=rest)
    return [int(order[i]) for i in [*range(top), *picked]]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min() + MINMAX_EPS)


def teacher_distribution(scores: np.ndarray, config: OptimConfig) -> np.ndarray:
    """p: the target distribution over the sampled documents."""
    s = np.asarray(scores, dtype=np.float64)
    if config.normalize == "minmax":
        s = _minmax(s)
    return _softmax(s / config.teacher_temperature)


def loss_and_gradient(
    w: np.ndarray, unit_docs: np.ndarray, p: np.ndarray, config: OptimConfig
) -> tuple[float, np.ndarray]:
    """KL(p‖q) at w and its gradient with respect to w: the chain rule KL → softmax → [min-max] → cosine, written
    out with as few array operations as possible (numpy's per-call overhead, not arithmetic, is the cost here)."""
    norm = max(math.sqrt(w @ w), COSINE_EPS)
    c = (unit_docs @ w) / norm
    inv_t = 1.0 / config.student_temperature
    if config.normalize == "minmax":
        lo, hi = int(c.argmin()), int(c.argmax())
        span = c[hi] - c[lo] + MINMAX_EPS
        shifted = c - c[lo]
        z = shifted * (inv_t / span)
    else:
        z = c * inv_t
    e = np.exp(z - z.max())
    q = e / e.sum()
    q_eps = q + KL_EPS
    loss = float(p @ np.log(p + KL_EPS) - p @ np.log(q_eps))
    ratio = p / q_eps  # dKL/dq = -ratio
    g_c = q * ((ratio @ q) - ratio) * inv_t  # through the softmax
    if config.normalize == "minmax":
        g_scaled = g_c
        g_c = g_scaled / span
        g_c[lo] -= g_scaled.sum() / span
        through_span = (g_scaled @ shifted) / span**2
        g_c[hi] -= through_span
        g_c[lo] += through_span
    g_c /= norm  # through the cosine: d cos_i / dw = (d̂_i - cos_i ŵ) / |w|
    return loss, g_c @ unit_docs - ((g_c @ c) / norm) * w


def refine(query: np.ndarray, sample_docs: np.ndarray, teacher_scores: np.ndarray, config: OptimConfig) -> Refined:
    """Adam on a copy of `query` toward the teacher's preferences over `sample_docs` (rows, any scale)."""
    unit_docs = unit_rows(sample_docs)
    p = teacher_distribution(teacher_scores, config)
    w = np.array(query, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    beta1, beta2 = ADAM_BETAS
    losses = []
    for t in range(1, config.steps + 1):
        loss, g = loss_and_gradient(w, unit_docs, p, config)
        losses.append(loss)
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        g *= g
        g *= 1 - beta2
        v += g
        denom = np.sqrt(v)
        denom *= 1 / math.sqrt(1 - beta2**t)
        denom += ADAM_EPS
        w -= (config.lr / (1 - beta1**t)) * m / denom
    loss_after, _ = loss_and_gradient(w, unit_docs, p, config)
    return Refined(vector=w, losses=losses, loss_after=loss_after)
