"""Step trajectories and `auto` early exit of gircse on the real default backbone, in float64."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.protocol import EmbedItem, EmbedRequest
from model_server.engine import EngineLimits
from model_server.loading import load_model
from model_server.serving import EmbeddingWorker
from model_server.specs import load_spec
from tests.models import cosine

TEXT = "How do solar panels turn sunlight into electricity?"
MAX_STEPS = 20


@pytest.fixture(scope="module")
def worker():
    worker = EmbeddingWorker(load_model(load_spec("smollm2-gircse", dtype="float64")), EngineLimits())
    worker.engine.start()
    yield worker
    worker.stop()


def _embed(worker: EmbeddingWorker, *items: EmbedItem):
    response = asyncio.run(worker.embed(EmbedRequest(items=list(items))))
    assert not [r.error for r in response.results if r.error]
    return response


def _metric(worker: EmbeddingWorker, name: str) -> float:
    return worker.metrics.registry.get_sample_value(name) or 0.0


def _drifts(rows: np.ndarray) -> list[float]:
    """1 - cos between the embeddings after steps i and i - 1, for i = 2..K (index 0 is step 2)."""
    return [1 - cosine(rows[i], rows[i - 1]) for i in range(1, len(rows))]


def test_trajectory_rows_are_the_embeddings_after_each_step(worker):
    k = 6
    response = _embed(
        worker,
        EmbedItem(text=TEXT, steps=k, trajectory=True),
        *(EmbedItem(text=TEXT, steps=i) for i in range(1, k + 1)),
        EmbedItem(text=TEXT, steps=0, trajectory=True),
    )
    outputs = response.outputs()
    vector, rows = outputs[0]
    assert rows.shape == (k, worker.loaded.dimension)
    assert np.array_equal(rows[-1], vector), "the last step's row is the embedding itself"
    for i in range(1, k + 1):
        assert 1 - cosine(rows[i - 1], outputs[i][0]) <= 1e-10, f"row {i} differs from refinement_steps={i}"
    assert np.allclose(np.linalg.norm(rows, axis=1), 1)
    assert outputs[-1][1].shape == (0, worker.loaded.dimension) and response.results[-1].trajectory == 0


def test_auto_leaves_the_batch_where_the_trajectory_says(worker):
    """The tolerance is set between two of this input's own step drifts, so the step it must stop at is known."""
    _, rows = _embed(worker, EmbedItem(text=TEXT, steps=MAX_STEPS, trajectory=True)).outputs()[0]
    drifts = _drifts(rows)
    # the first step (>= 3) whose drift is below every earlier one: a tolerance just above it stops exactly there
    stop = next(i + 2 for i in range(1, len(drifts)) if drifts[i] < min(drifts[:i]))
    tolerance = (drifts[stop - 2] + min(drifts[: stop - 2])) / 2
    steps_before = _metric(worker, "genembed_worker_refinement_steps_total")
    saved_before = _metric(worker, "genembed_worker_refinement_steps_saved_total")
    response = _embed(
        worker,
        EmbedItem(text=TEXT, steps=MAX_STEPS, tolerance=tolerance),
        EmbedItem(text=TEXT, steps=MAX_STEPS, tolerance=0.0),
    )
    (early, _), (full, _) = response.outputs()
    assert [r.steps for r in response.results] == [stop, MAX_STEPS]
    assert stop < MAX_STEPS
    assert 1 - cosine(early, rows[stop - 1]) <= 1e-10
    assert 1 - cosine(full, rows[-1]) <= 1e-10
    # the engine ran `stop` steps for the early one, not MAX_STEPS and a trim
    assert _metric(worker, "genembed_worker_refinement_steps_total") - steps_before == stop + MAX_STEPS
    assert _metric(worker, "genembed_worker_refinement_steps_saved_total") - saved_before == MAX_STEPS - stop


def test_a_huge_tolerance_stops_at_the_second_step(worker):
    """Step 1 has no step before it, so the earliest exit is after step 2."""
    response = _embed(worker, EmbedItem(text=TEXT, steps=MAX_STEPS, tolerance=2.0, trajectory=True))
    assert response.results[0].steps == 2 and response.results[0].trajectory == 2
