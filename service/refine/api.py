"""Request and response models of /v1/refine-query and /v1/corpora.

Defaults are the paper's (20 sampled documents, all from the top, seed 42; Adam 100 steps at lr 1e-4, both
temperatures 1, no normalisation). `normalize: "minmax"` is the ReFIT preset: unless the request sets them,
it also changes the teacher temperature to 2 and the learning rate to 5e-3, as the paper's code does.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.openai_api import EncodingFormat, Usage
from service.refine.optimizer import Normalize, OptimConfig

TeacherType = Literal["llm", "cross_encoder", "embedder", "labels"]

_ID = Field(min_length=1, max_length=256)
_MINMAX_TEACHER_TEMPERATURE = 2.0
_MINMAX_LR = 5e-3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(_Strict):
    id: str = _ID
    text: str | None = Field(default=None, min_length=1, description="needed unless `embedding` is given")
    embedding: list[float] | None = Field(default=None, description="the student model's vector; skips embedding")

    @model_validator(mode="after")
    def _text_or_embedding(self) -> Document:
        if self.text is None and self.embedding is None:
            raise ValueError(f"document {self.id!r} needs a text or an embedding")
        if self.embedding is not None and not all(math.isfinite(x) for x in self.embedding):
            raise ValueError(f"document {self.id!r}: the embedding holds a non-finite value")
        return self


class Teacher(_Strict):
    type: TeacherType
    model: str | None = Field(
        default=None,
        description="llm: the judge model (default GENEMBED_JUDGE_MODEL); cross_encoder / embedder: a model served "
        "by this gateway",
    )
    labels: dict[str, float] | None = Field(default=None, description="labels: gold score per document id")
    max_concurrency: int | None = Field(default=None, gt=0, le=256, description="llm: judge calls in flight")
    timeout_s: float | None = Field(default=None, gt=0, le=600, description="llm: deadline of one judge call")
    instruction: str | None = Field(
        default=None,
        description="llm: the task the judge is told to judge by (default: the request's instruction); an empty "
        "string tells none, as the paper's code does on search tasks",
    )

    @model_validator(mode="after")
    def _complete(self) -> Teacher:
        if self.type == "labels" and self.labels is None:
            raise ValueError("teacher.labels is required for the labels teacher")
        if self.type != "labels" and self.labels is not None:
            raise ValueError("teacher.labels is only for the labels teacher")
        if self.type != "llm" and self.instruction is not None:
            raise ValueError("teacher.instruction is only for the llm teacher")
        if self.type in ("cross_encoder", "embedder") and not self.model:
            raise ValueError(f"teacher.model is required for the {self.type} teacher: a model this gateway serves")
        return self


class Sampling(_Strict):
    total: int = Field(default=20, gt=1, le=1000, description="documents the teacher scores")
    from_top: int | None = Field(
        default=None, ge=0, description="of them, the most similar (default: all); the rest are drawn at random"
    )
    seed: int = 42

    @model_validator(mode="after")
    def _within_total(self) -> Sampling:
        if self.from_top is not None and self.from_top > self.total:
            raise ValueError(f"sampling.from_top={self.from_top} exceeds sampling.total={self.total}")
        return self

    @property
    def top(self) -> int:
        return self.total if self.from_top is None else self.from_top


class Optimization(_Strict):
    steps: int = Field(default=100, ge=0, le=10_000)
    lr: float = Field(default=1e-4, gt=0, le=10)
    teacher_temperature: float = Field(default=1.0, gt=0)
    student_temperature: float = Field(default=1.0, gt=0)
    normalize: Normalize = "none"
    min_teacher_spread: float = Field(default=0.05, ge=0, description="max − min teacher score below it: no refinement")

    @model_validator(mode="after")
    def _minmax_preset(self) -> Optimization:
        if self.normalize == "minmax":
            if "teacher_temperature" not in self.model_fields_set:
                self.teacher_temperature = _MINMAX_TEACHER_TEMPERATURE
            if "lr" not in self.model_fields_set:
                self.lr = _MINMAX_LR
        return self

    def config(self) -> OptimConfig:
        return OptimConfig(self.steps, self.lr, self.teacher_temperature, self.student_temperature, self.normalize)


class Hyde(_Strict):
    model: str | None = Field(default=None, description="the writing LLM (default GENEMBED_JUDGE_MODEL)")
    mode: Literal["replace", "start"] = Field(
        default="replace",
        description="replace: the passage's embedding stands for the query throughout; start: the query ranks and "
        "picks the sample, the passage's embedding is where the optimisation starts",
    )
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=256, gt=0, le=2048)


class RefineRequest(_Strict):
    model: str = Field(description="the embedding (student) model")
    query: str = Field(min_length=1)
    instruction: str | None = Field(default=None, description="the model's instruction; also shown to an LLM judge")
    refinement_steps: int | None = Field(default=None, description="K for embedding; the model's default when omitted")
    documents: list[Document] | None = Field(default=None, min_length=1)
    corpus_id: str | None = None
    teacher: Teacher
    sampling: Sampling = Sampling()
    optimization: Optimization = Optimization()
    hyde: Hyde | None = None
    top_k: int | None = Field(
        default=None, gt=0, description="ranking entries returned (default: all documents, or 10 for a corpus)"
    )
    encoding_format: EncodingFormat = "float"
    return_embedding: bool = True
    return_teacher_scores: bool = Field(default=True, description="`teacher_score` on the sampled documents")
    return_trajectory: bool = Field(default=False, description="the loss before every step")

    @model_validator(mode="after")
    def _one_candidate_source(self) -> RefineRequest:
        if (self.documents is None) == (self.corpus_id is None):
            raise ValueError("give exactly one of `documents` and `corpus_id`")
        if self.documents is not None:
            ids = [d.id for d in self.documents]
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise ValueError(f"document id {dup!r} appears more than once")
        return self


class RankedDocument(BaseModel):
    id: str
    rank: int = Field(description="1 = best, after refinement")
    score: float = Field(description="cosine to the refined query")
    original_rank: int
    original_score: float = Field(description="cosine to the original query")
    teacher_score: float | None = Field(default=None, description="present where the teacher scored the document")


class TeacherError(BaseModel):
    id: str
    code: str
    message: str


class TeacherReport(BaseModel):
    type: TeacherType
    model: str | None
    sampled: int
    scored: int
    spread: float | None = Field(description="max − min over the scored documents")
    calls: int = Field(description="judge / worker calls made (cache hits excluded)")
    cache_hits: int
    errors: list[TeacherError]


class Timings(BaseModel):
    """Milliseconds per phase."""

    hyde: float = 0.0
    embed: float = 0.0
    initial_ranking: float = 0.0
    teacher: float = 0.0
    optimize: float = 0.0
    final_ranking: float = 0.0
    total: float = 0.0


class Diagnostics(BaseModel):
    refined: bool
    skipped_reason: str | None = None
    steps: int = Field(description="optimisation steps run")
    loss_before: float | None
    loss_after: float | None
    cosine_to_original: float
    teacher: TeacherReport
    hyde_passage: str | None = None
    loss_trajectory: list[float] | None = None
    timings_ms: Timings


class RefineResponse(BaseModel):
    object: Literal["refinement"] = "refinement"
    model: str
    corpus_id: str | None
    data: list[RankedDocument]
    embedding: list[float] | str | None = Field(description="the refined query vector (unit length)")
    diagnostics: Diagnostics
    usage: Usage


# -- corpora ------------------------------------------------------------------------------------------


class CorpusDocument(_Strict):
    id: str = _ID
    text: str = Field(min_length=1)


def _unique_ids(documents: list[CorpusDocument]) -> list[CorpusDocument]:
    seen: set[str] = set()
    for d in documents:
        if d.id in seen:
            raise ValueError(f"document id {d.id!r} appears more than once")
        seen.add(d.id)
    return documents


class CorpusCreate(_Strict):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$", description="letters, digits, . _ -")
    model: str
    refinement_steps: int | None = Field(default=None, description="K for the documents; the model's default")
    documents: list[CorpusDocument] = Field(default_factory=list)

    _ids = field_validator("documents")(_unique_ids)


class CorpusAdd(_Strict):
    documents: list[CorpusDocument] = Field(min_length=1)

    _ids = field_validator("documents")(_unique_ids)


class CorpusCard(BaseModel):
    id: str
    object: Literal["corpus"] = "corpus"
    model: str
    served_model: str
    revision: str = Field(description="the model revision the vectors came from")
    dimension: int
    refinement_steps: int
    documents: int
    created_at: int
    updated_at: int


class CorpusDeleted(BaseModel):
    id: str
    object: Literal["corpus.deleted"] = "corpus.deleted"
    deleted: bool = True
