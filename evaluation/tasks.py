"""Offline mteb tasks from the Lee corpus that the gensim wheel ships (`pip install --no-deps gensim==4.4.0`),
evaluated by mteb's own STS and retrieval evaluators; nothing is downloaded.

- `LeeSTS`: the 1,225 pairs of the 50 `lee.cor` articles against the human ratings of `similarities0-1.txt`
  (main score: cosine Spearman).
- `LeeKnownItemRetrieval`: each `lee_background.cor` article's first sentence is a query whose one relevant
  document is the rest of that article, among all the rests (main score: nDCG@10; MRR@10 is reported too).

Both take `limit`: the first N articles only (N·(N−1)/2 STS pairs; N queries among N documents), for quick runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from evaluation.lee import lee_known_items, lee_sts

_LEE = {
    "reference": "https://github.com/piskvorky/gensim/tree/develop/gensim/test/test_data",
    "dataset": {"path": "gensim/test/test_data", "revision": "gensim-4.4.0"},  # read from the wheel, not a hub
    "category": "t2t",
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "date": ("2001-01-01", "2002-12-31"),
    "domains": ["News", "Written"],
    "license": "not specified",
    "dialect": [],
    "modalities": ["text"],
    "sample_creation": "found",
    "bibtex_citation": r"""@inproceedings{lee2005empirical,
  title = {An Empirical Evaluation of Models of Text Document Similarity},
  author = {Lee, Michael D. and Pincombe, Brandon and Welsh, Matthew},
  booktitle = {Proceedings of the 27th Annual Conference of the Cognitive Science Society},
  year = {2005},
}""",
}


class LeeSTS(AbsTaskSTS):
    metadata = TaskMetadata(
        name="LeeSTS",
        description="Human similarity ratings of every pair of 50 Australian news articles (Lee et al., 2005).",
        type="STS",
        main_score="cosine_spearman",
        annotations_creators="human-annotated",
        **_LEE,
    )
    min_score = 0
    max_score = 1

    def __init__(self, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        texts, ratings = lee_sts()
        first, second = np.triu_indices(len(texts), 1)  # the order of lee_sts' ratings
        keep = np.ones(len(first), bool) if self.limit is None else (second < self.limit)
        pairs = {
            "sentence1": [texts[i] for i in first[keep]],
            "sentence2": [texts[j] for j in second[keep]],
            "score": ratings[keep].tolist(),
        }
        self.dataset = DatasetDict({"test": Dataset.from_dict(pairs)})
        self.data_loaded = True


class LeeKnownItemRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(
        name="LeeKnownItemRetrieval",
        description="Known-item search over 300 news articles: the query is an article's first sentence, the one "
        "relevant document the rest of that article.",
        type="Retrieval",
        main_score="ndcg_at_10",
        annotations_creators="derived",
        **_LEE,
    )
    k_values = (1, 3, 5, 10, 20, 100)

    def __init__(self, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        queries, rests = lee_known_items()
        queries, rests = queries[: self.limit], rests[: self.limit]
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": f"q{i}", "text": q} for i, q in enumerate(queries)]),
            corpus=Dataset.from_list([{"id": f"d{i}", "text": r, "title": ""} for i, r in enumerate(rests)]),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(queries))},
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True
