"""The ICR trainer: the loss by hand, the differentiable rollout, training, resuming, train-serve
consistency through the engine, the Debian pairs builder and the Lee loaders. Tiny random Llamas."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli.main import build_parser
from common.protocol import EmbedItem
from evaluation import lee
from model_server.loading import load_model
from model_server.training import data
from model_server.training.config import TrainConfig, command_line, config_from_args
from model_server.training.icr import (
    IcrTrainer,
    icr_loss,
    prefix_embeddings,
    refinement_regulariser,
    rollout,
)
from tests.models import cosine, embed_all, gircse_spec, make_tiny_llama, reference_gircse, start_worker

TOPICS = ["apples", "trains", "music", "rivers", "chess", "bread", "stars", "glass"]
TOY_PAIRS = [{"query": f"about {w}", "document": f"A long text on {w}, and more on {w}."} for w in TOPICS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "pairs.jsonl"
    data.write_jsonl(path, TOY_PAIRS)
    return path


def spec_file(directory: Path, backbone: Path) -> Path:
    """A spec file for the tiny model, as a user would write one for their own backbone."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(gircse_spec(backbone).model_dump(mode="json")))
    return path


def toy_config(tmp: Path, backbone: Path, toy_data: Path, **fields) -> TrainConfig:
    settings = dict(
        data=toy_data,
        output_dir=tmp / "run",
        model=str(spec_file(tmp, backbone)),
        refinement_steps=3,
        steps=12,
        batch_size=8,
        lr=1e-2,
        warmup_steps=0,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        threads=1,
    )
    return TrainConfig(**{**settings, **fields})


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in data.read_jsonl(run_dir / "losses.jsonl")]


# ---------------------------------------------------------------------------------------------
# The objective


def test_icr_loss_by_hand():
    # B = 2 queries, D = 3 documents (the third a hard negative), K = 2 steps, H = 2.
    queries = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    documents = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]]
    )  # document 0 turns from (1, 0) to (1, 1)/√2 after its second step
    tau, weight = 0.5, 0.7
    got = icr_loss(queries, documents, tau, weight)

    def nce(scores: list[float], target: int) -> float:
        return -scores[target] / tau + math.log(sum(math.exp(s / tau) for s in scores))

    r = 1 / math.sqrt(2)
    loss_1 = (nce([1, 0, -1], 0) + nce([0, 1, 0], 1)) / 2  # prefix i = 1: the first states
    loss_2 = (nce([r, 0, -1], 0) + nce([r, 1, 0], 1)) / 2  # prefix i = 2: the means of both
    regulariser = max(0.0, math.log(loss_2) - math.log(loss_1))
    assert got.prefix.tolist() == pytest.approx([loss_1, loss_2], rel=1e-6)
    assert got.regulariser.item() == pytest.approx(regulariser, rel=1e-5)
    assert got.total.item() == pytest.approx((loss_1 + loss_2) / 2 + weight * regulariser, rel=1e-6)


def test_regulariser_is_zero_when_every_step_helps():
    assert refinement_regulariser(torch.tensor([2.0, 1.5, 1.0, 0.9])).item() == 0.0
    assert refinement_regulariser(torch.tensor([1.0])).item() == 0.0
    rising = refinement_regulariser(torch.tensor([1.0, 2.0, 1.0]))  # one step of two got worse
    assert rising.item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_prefix_embeddings_are_the_served_vectors():
    states = torch.randn(3, 4, 8, dtype=torch.float64)
    got = prefix_embeddings(states)
    for k in range(1, 5):
        want = torch.nn.functional.normalize(states[:, :k].mean(dim=1).float(), dim=-1)
        torch.testing.assert_close(got[:, k - 1], want)


# ---------------------------------------------------------------------------------------------
# The differentiable gircse computation


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recompute"])
def test_rollout_equals_the_research_definition(tiny, use_cache):
    """Left-padded prompts of different lengths in one batch, each equal to its own reference."""
    model = load_model(gircse_spec(tiny, dtype="float64")).model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [100, 200, 300, 400]]
    states = rollout(model, prompts, 4, temperature=1.0, use_cache=use_cache)
    assert states.shape == (3, 4, 32)
    for row, prompt in enumerate(prompts):
        for k in (1, 4):
            got = prefix_embeddings(states[row : row + 1])[0, k - 1].numpy()
            assert 1 - cosine(got, reference_gircse(model, prompt, k)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, toy_data) -> IcrTrainer:
    tmp = tmp_path_factory.mktemp("icr")
    trainer = IcrTrainer(toy_config(tmp, tiny, toy_data, eval_data=toy_data, save_every=6))
    trainer.run()
    return trainer


def test_loss_falls_on_a_fixed_toy_set(trained):
    run = trained.run_dir
    history = losses(run)
    assert len(history) == 12
    assert history[-1] < 0.5 * history[0]
    rows = data.read_jsonl(run / "losses.jsonl")
    assert len(rows[0]["prefix_losses"]) == 3 and rows[0]["pairs_per_s"] > 0
    evals = data.read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[-1]["mrr10_by_k"][-1] > evals[0]["mrr10_by_k"][-1]
    assert (run / "adapter" / "adapter_config.json").is_file()
    card = (run / "adapter" / "README.md").read_text()
    assert "--refinement-steps 3" in card and "held-out MRR@10 by K at step 12" in card
    assert (run / "checkpoint" / "state.pt").is_file()


def test_adapter_served_by_the_engine_equals_the_trainers_forward(trained, tiny):
    """The adapter directory, named by a spec, gives through the engine (LoRA merged, KV slots,
    continuous batching) the embedding the trainer computes in eval mode, for every K trained."""
    trained.model.eval()
    texts = [("about rivers", "query"), ("A long text on chess, and more on chess.", "document")]
    with torch.no_grad():
        want = prefix_embeddings(trained.states([trained.prompts.ids(t, kind) for t, kind in texts]))
    spec = gircse_spec(tiny, adapter=str(trained.run_dir / "adapter"), dtype="float32")
    worker, base = start_worker(spec), start_worker(gircse_spec(tiny, dtype="float32"))
    try:
        for k in (1, 2, 3):
            items = [EmbedItem(text=t, input_type=kind, steps=k) for t, kind in texts]
            served, untrained = embed_all(worker, items), embed_all(base, items)
            for row in range(len(texts)):
                assert cosine(served[row], want[row, k - 1].numpy()) >= 0.99999
                assert cosine(untrained[row], want[row, k - 1].numpy()) < 0.99  # the adapter matters
    finally:
        worker.stop()
        base.stop()


def test_resume_continues_exactly(tmp_path, tiny, toy_data, monkeypatch):
    fields = dict(steps=6, save_every=3, lora_dropout=0.1)  # dropout: the RNG state must resume too
    straight = toy_config(tmp_path / "a", tiny, toy_data, **fields)
    IcrTrainer(straight).run()

    interrupted = toy_config(tmp_path / "b", tiny, toy_data, **fields)
    real_step = IcrTrainer.train_step

    def crash_at_five(self):
        if self.step == 4:  # step 4 is logged but not checkpointed
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(IcrTrainer, "train_step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        IcrTrainer(interrupted).run()
    monkeypatch.setattr(IcrTrainer, "train_step", real_step)
    assert len(losses(interrupted.output_dir)) == 4
    with pytest.raises(ValueError, match="already holds a run"):
        IcrTrainer(interrupted).run()
    with pytest.raises(ValueError, match="lr"):
        IcrTrainer(interrupted.model_copy(update={"resume": True, "lr": 1e-3})).run()
    IcrTrainer(interrupted.model_copy(update={"resume": True})).run()
    assert losses(interrupted.output_dir) == pytest.approx(losses(straight.output_dir), rel=1e-6)


def test_gradient_checkpointing_computes_the_same_training(tmp_path, tiny, toy_data):
    """Checkpointing re-runs every step without a KV cache: the same losses, so the same gradients."""
    runs = [
        toy_config(tmp_path / name, tiny, toy_data, steps=3, gradient_checkpointing=gc)
        for name, gc in (("plain", False), ("checkpointed", True))
    ]
    for config in runs:
        IcrTrainer(config).run()
    assert losses(runs[1].output_dir) == pytest.approx(losses(runs[0].output_dir), rel=1e-5)


def test_cli_flags_build_the_config(toy_data):
    flags = ["--data", str(toy_data), "--output-dir", "out", "--lora-target-modules", "q_proj", "v_proj"]
    flags += ["--gradient-checkpointing", "--precision", "fp32", "--steps", "7", "--lr", "3e-4"]
    args = build_parser().parse_args(["train", *flags])
    config = config_from_args(args)
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.gradient_checkpointing and config.precision == "fp32"
    assert (config.steps, config.lr, config.refinement_steps, config.data) == (7, 3e-4, 5, toy_data)
    # the model card's command gives the same settings back
    again = config_from_args(build_parser().parse_args(shlex.split(command_line(config))[1:]))
    assert again == config
    missing = build_parser().parse_args(["train", "--data", "nowhere.jsonl", "--output-dir", "out"])
    assert missing.run(missing) == 2  # a clear message, not a traceback


# ---------------------------------------------------------------------------------------------
# Data

# A captured sample: `apt-cache dumpavail` stanzas (synopsis only, as Debian ships them) and the
# Translation-en stanzas that carry the long descriptions, keyed by Description-md5.
AVAILABLE = """\
Package: libfoo1
Source: foo (1.2-1)
Version: 1.2-1+b1
Description: Foo compression library - runtime
Description-md5: aaa1
Section: libs

Package: libfoo-dev
Source: foo
Description: Foo compression library - development files
Description-md5: aaa2

Package: foo-tools
Source: foo
Description: command-line tools for Foo archives
Description-md5: aaa3

Package: old-foo
Source: foo
Description: transitional package for libfoo1
Description-md5: aaa4

Package: barview
Description: viewer for Bar images
Description-md5: bbb1

Package: barview2
Description: viewer for bar images
Description-md5: bbb2

Package: barview-data
Description: data files for barview
Description-md5: bbb3

Package: tinydoc
Description: tiny package
Description-md5: ccc1

Package: inline
Description: a package whose record carries its own long description
 The long description lives in the Packages record itself here, on
 systems whose archive does not split descriptions out.
 .
 It still has to be long enough to be kept by the builder.
"""

FOO = " Foo is a fast compression library with a small memory footprint and a\n stable API, used by many archivers.\n"
TRANSLATIONS = f"""\
Package: libfoo1
Description-md5: aaa1
Description-en: Foo compression library - runtime
{FOO} .
 This package contains the shared library.

Package: libfoo-dev
Description-md5: aaa2
Description-en: Foo compression library - development files
{FOO} .
 This package contains the headers and the static library:
  - foo.h
  - libfoo.a

Package: foo-tools
Description-md5: aaa3
Description-en: command-line tools for Foo archives
 The foo and unfoo commands create and extract Foo archives from the shell,
 with progress output.

Package: old-foo
Description-md5: aaa4
Description-en: transitional package for libfoo1
 This is a transitional package. It can safely be removed after the upgrade,
 as nothing depends on it any more.

Package: barview
Description-md5: bbb1
Description-en: viewer for Bar images
 Barview shows Bar images with zoom, rotation and a slideshow mode, and
 prints them.

Package: barview2
Description-md5: bbb2
Description-en: viewer for bar images
 A second viewer under the same synopsis; a query with two right answers
 cannot be scored, so the builder drops it.

Package: barview-data
Description-md5: bbb3
Description-en: data files for barview
 Barview shows Bar images with zoom, rotation and a slideshow mode, and
 prints them.

Package: tinydoc
Description-md5: ccc1
Description-en: tiny package
 Too short.
"""


def test_debian_pairs_from_a_captured_sample():
    packages = {p.name: p for p in data.packages_from_text(AVAILABLE, TRANSLATIONS)}
    assert packages["libfoo1"].source == "foo" and packages["barview"].source == "barview"
    assert packages["libfoo-dev"].description.endswith(
        "This package contains the headers and the static library:\n- foo.h\n- libfoo.a"
    )
    assert packages["libfoo1"].description.startswith("Foo is a fast compression library with a small memory footprint")
    assert "\n\n" in packages["inline"].description  # the record's own long description, paragraphs kept

    train, heldout = data.build_pairs(list(packages.values()), heldout_fraction=0.0, min_description_chars=60)
    assert heldout == []
    names = [row["id"] for row in train]
    # dropped: the placeholder, a second "viewer for Bar images" (same synopsis), a second
    # description of Barview (same description), the short one
    assert names == ["barview", "foo-tools", "inline", "libfoo-dev", "libfoo1"]
    rows = {row["id"]: row for row in train}
    assert rows["libfoo1"]["query"] == "Foo compression library - runtime"
    assert rows["barview"]["negatives"] == []
    siblings = {packages[n].description for n in ("libfoo-dev", "foo-tools")}
    assert set(rows["libfoo1"]["negatives"]) == siblings  # hard negatives: the same source's others

    # the split is by source package and stable: all of foo's packages land on one side
    held_any = False
    for seed in range(20):
        train, heldout = data.build_pairs(list(packages.values()), 0.5, seed=seed, min_description_chars=60)
        held = {r["id"] for r in heldout}
        assert len(held & {"libfoo1", "libfoo-dev", "foo-tools"}) in (0, 3)
        held_any |= bool(held)
    assert held_any
    again = data.build_pairs(list(packages.values()), heldout_fraction=0.5, seed=3)
    assert again == data.build_pairs(list(packages.values()), heldout_fraction=0.5, seed=3)


def test_pairs_round_trip_through_jsonl(tmp_path):
    rows = [{"id": "x", "query": "q ü", "document": "d\n\nmore", "negatives": ["n"]}]
    data.write_jsonl(tmp_path / "deep" / "p.jsonl", rows)
    assert data.read_jsonl(tmp_path / "deep" / "p.jsonl") == rows
    assert json.loads((tmp_path / "deep" / "p.jsonl").read_text())["query"] == "q ü"


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim==4.4.0")
def test_lee_loaders():
    texts, ratings = lee.lee_sts()
    assert len(texts) == 50 and ratings.shape == (50 * 49 // 2,)
    assert ratings.min() >= 0 and ratings.max() <= 1
    queries, targets = lee.lee_known_items()
    assert len(queries) == len(targets) > 250
    assert all(len(q) > 20 and len(t) > 100 for q, t in zip(queries, targets, strict=True))


def test_ranking_metrics_by_hand():
    # Query i's right document is document i. Query 0 finds it first; query 1 ranks it second (one document
    # scores higher, one ties: a tie does not count against it); query 2's is 12th of 12, outside the top 10.
    docs = np.eye(12)
    queries = np.zeros((12, 12))
    queries[0, 0] = 1.0
    queries[1, [1, 4, 5]] = [0.5, 0.5, 0.9]
    queries[2] = 1.0
    queries[2, 2] = 0.0
    ranks = lee.ranks_of_the_right_document(queries, docs)[:3]
    assert ranks.tolist() == [1, 2, 12]
    assert lee.mrr10(ranks) == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert lee.ndcg10(ranks) == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
