"""Evaluation data this machine has offline, and the ranking metrics.

Lee (gensim's test data, located without importing gensim): `lee.cor` (50 news articles) with
`similarities0-1.txt` (human pair ratings) for STS, and `lee_background.cor` (300 articles) for
known-item retrieval: the query is an article's first sentence, the one relevant document its rest.
The ranking metrics (MRR@10, nDCG@10 with one relevant document) are shared by the trainer's held-out
evaluation, evaluation/tasks.py and the load-test evaluations.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def lee_dir() -> Path:
    spec = importlib.util.find_spec("gensim")  # finding it does not import it (nor numpy/scipy of its own)
    if spec is None or spec.origin is None:
        raise SystemExit("the Lee corpus ships with gensim: pip install --no-deps gensim==4.4.0")
    return Path(spec.origin).parent / "test" / "test_data"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def lee_sts() -> tuple[list[str], np.ndarray]:
    """The 50 Lee articles and the human similarity of each pair i < j, in np.triu_indices order."""
    texts = _lines(lee_dir() / "lee.cor")
    ratings = np.loadtxt(lee_dir() / "similarities0-1.txt")
    if ratings.shape != (len(texts), len(texts)):
        raise ValueError(f"{len(texts)} Lee articles but a {ratings.shape} rating matrix")
    return texts, ratings[np.triu_indices(len(texts), 1)]


def lee_known_items() -> tuple[list[str], list[str]]:
    """(first sentences, rests) of the Lee background articles: query i's only answer is rest i."""
    queries, targets = [], []
    for line in _lines(lee_dir() / "lee_background.cor"):
        parts = _SENTENCE_END.split(line, maxsplit=1)
        if len(parts) == 2 and len(parts[0]) > 20 and len(parts[1]) > 100:
            queries.append(parts[0])
            targets.append(parts[1])
    return queries, targets


def ranks_of_the_right_document(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """1-based rank of document i for query i among all the documents (a tie does not count against
    it); rows L2-normalised. Every task here has one relevant document per query."""
    scores = queries @ documents.T
    return (scores > np.diag(scores)[:, None]).sum(axis=1) + 1


def mrr10(ranks: np.ndarray) -> float:
    return float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))


def ndcg10(ranks: np.ndarray) -> float:
    return float(np.mean(np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)))
