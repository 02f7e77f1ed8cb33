"""The engine's step kernels: packed projections (oneDNN's, and genembed's own GEMM that takes its place on AVX2-only
CPUs) against torch's own, and the padded decode step that CUDA graphs replay (run here without capture: the
padding, buckets and masks are the same code)."""

from __future__ import annotations

import pytest
import torch

from common.protocol import EmbedItem
from model_server.runners import packed as packed_module
from model_server.runners.cpu_kernels import cpu_kernels
from model_server.runners.fast import GRAPH_BUCKETS, DecodeGraphs, graph_bucket
from model_server.runners.packed import PackedLinear, gemm_dtype, own_gemm, pack_linears
from model_server.settings import WorkerSettings
from model_server.specs import load_spec
from tests.models import cosine, embed_all, gircse_spec, make_tiny_llama, reference_gircse, start_worker

#: oneDNN packs bf16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere bf16 packs for fp32 GEMMs
BF16_PACKS = gemm_dtype(torch.bfloat16) == torch.bfloat16

TEXTS = [
    "What is the boiling point of water at sea level?",
    "A mixture of hydrogen and oxygen burns with a pale blue flame.",
    "Rivers carry sediment to the sea",
]


#: the GEMMs a projection may be packed for: oneDNN's, and genembed's own (`own_gemm`), each tested on any CPU
GEMMS = ["onednn", "genembed"]


def _gemm(name: str):
    if name == "onednn":
        return None
    built = cpu_kernels()
    assert built is not None, "genembed's kernels must build on the CI machines"
    return built


@pytest.fixture
def cpu_runs_at(monkeypatch):
    """Make `own_gemm` see torch's CPU capability as the given one (the kernels themselves build at the real one,
    first)."""
    _gemm("genembed")

    def at(capability: str) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return at


@pytest.mark.parametrize(
    ("capability", "kernels", "own"), [("AVX2", "auto", True), ("AVX2", "torch", False), ("AVX512", "auto", False)]
)
def test_genembeds_gemm_where_torch_runs_at_avx2(cpu_runs_at, capability, kernels, own):
    cpu_runs_at(capability)
    assert (own_gemm(load_spec("smollm2-gircse", kernels=kernels)) is not None) == own


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype, tolerance, bias, gemm):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=bias).to(dtype)
    packed = PackedLinear.of(linear, _gemm(gemm))
    with torch.inference_mode():
        for shape in ((1, 576), (16, 576), (3, 7, 576)):
            x = torch.randn(shape, dtype=dtype)
            want = linear(x).float()
            got = packed(x)
            assert got.dtype == dtype and got.shape == want.shape
            assert (got.float() - want).abs().max() <= tolerance * want.abs().max()


@pytest.fixture
def fp32_gemms(monkeypatch):
    """bf16 weights packed for fp32 GEMMs, as on a CPU without a bf16 GEMM, whatever this CPU has."""
    monkeypatch.setattr(packed_module, "gemm_dtype", lambda dtype: torch.float32)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_through_fp32_gemms_rounds_as_a_bf16_gemm(fp32_gemms, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=bias).to(torch.bfloat16)
    packed = PackedLinear.of(linear)
    assert packed.gemm_dtype == torch.float32
    wide = linear.weight.float(), None if linear.bias is None else linear.bias.float()
    with torch.inference_mode():
        for shape in ((1, 576), (16, 576), (3, 7, 576)):
            x = torch.randn(shape, dtype=torch.bfloat16)
            got = packed(x)
            # exact products and fp32 sums, rounded once: at most one bf16 step (1/128 relative) from the fp32 GEMM's
            # own rounding, whose summation order may differ
            want = torch.nn.functional.linear(x.float(), *wide)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert ((got.float() - want).abs() <= want.abs() / 128 + 1e-6).all()
            assert (got.float() - linear(x).float()).abs().max() <= 1e-2 * want.abs().max()


def test_pack_linears_swaps_every_projection_and_the_head_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path, num_hidden_layers=2))
    embedding = model.get_input_embeddings().weight
    assert pack_linears(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert pack_linears(model) == 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.get_input_embeddings().weight is embedding  # the tied embedding matrix stays


@pytest.mark.parametrize("gemm", GEMMS)
def test_packed_soft_token_mix_equals_the_matmul(tmp_path, gemm):
    from transformers import AutoModelForCausalLM

    from model_server.methods.gircse import soft_tokens

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path)).eval()
    mix = PackedLinear(model.get_input_embeddings().weight.t().contiguous(), gemm=_gemm(gemm))
    with torch.inference_mode():
        hidden = torch.randn(5, model.config.hidden_size)
        want = soft_tokens(model, hidden, 1.0)
        got = soft_tokens(model, hidden, 1.0, mix)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_worker_setting_reaches_the_spec(monkeypatch):
    monkeypatch.setenv("GENEMBED_WORKER_LINEAR", "eager")
    monkeypatch.setenv("GENEMBED_WORKER_CUDA_GRAPHS", "false")
    monkeypatch.setenv("GENEMBED_WORKER_KERNELS", "torch")
    overrides = WorkerSettings().spec_overrides()
    assert overrides == {"linear": "eager", "cuda_graphs": False, "kernels": "torch"}
    spec = load_spec("smollm2-gircse", **overrides)
    assert spec.linear == "eager" and spec.cuda_graphs is False and spec.kernels == "torch"
    assert load_spec("smollm2-gircse").linear == "auto"


@pytest.fixture(scope="module")
def workers32():
    """Packed for oneDNN's GEMM, for genembed's (the worker told the CPU runs at AVX2), and eager."""
    assert cpu_kernels() is not None  # built at this CPU's own capability before any is pretended
    workers = {}
    for name, linear, capability in (
        ("onednn", "packed", "AVX512"),
        ("genembed", "packed", "AVX2"),
        ("eager", "eager", "AVX2"),
    ):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
            workers[name] = start_worker(load_spec("smollm2-gircse", dtype="float32", linear=linear))
    yield workers
    for worker in workers.values():
        worker.stop()


@pytest.mark.parametrize("gemm", GEMMS)
def test_gircse_float32_packed_equals_eager(workers32, gemm):
    packed, eager = workers32[gemm], workers32["eager"]
    assert type(packed.loaded.model.lm_head) is PackedLinear
    assert (packed.loaded.model.lm_head.gemm is not None) == (gemm == "genembed")
    assert type(eager.loaded.model.lm_head) is torch.nn.Linear
    # fp32 keeps the matmul for probs @ E on oneDNN; on genembed's GEMM (faster there) it is packed too
    assert (packed.method.mix is not None) == (gemm == "genembed") and eager.method.mix is None
    if gemm == "genembed":
        assert packed.method.mix.gemm is not None
    # prefill rows padded to a bounded set of counts only for oneDNN, which keeps a kernel per shape
    assert packed.method.runner.pads_rows == (gemm == "onednn") and eager.method.runner.pads_rows
    items = [EmbedItem(text=t, input_type="query", steps=k) for t in TEXTS for k in (0, 1, 5)]
    for a, b in zip(embed_all(packed, items), embed_all(eager, items), strict=True):
        assert cosine(a, b) >= 0.99999


def test_gircse_bfloat16_packs_the_soft_token_mix():
    vectors = {}
    for linear in ("packed", "eager"):
        worker = start_worker(load_spec("smollm2-gircse", dtype="bfloat16", linear=linear))
        try:
            assert (worker.method.mix is not None) == (linear == "packed")
            vectors[linear] = embed_all(worker, [EmbedItem(text=t, input_type="query", steps=2) for t in TEXTS])
        finally:
            worker.stop()
    for a, b in zip(vectors["packed"], vectors["eager"], strict=True):
        assert cosine(a, b) >= 0.99


def test_o1_bfloat16_packed_close_to_eager():
    vectors = {}
    for linear in ("packed", "eager"):
        worker = start_worker(load_spec("smollm2-o1", dtype="bfloat16", linear=linear, thought_temperature=0.0))
        try:
            assert (type(worker.loaded.model.lm_head) is PackedLinear) == (linear == "packed")
            vectors[linear] = embed_all(worker, [EmbedItem(text=t, input_type="query", steps=6) for t in TEXTS])
        finally:
            worker.stop()
    for a, b in zip(vectors["packed"], vectors["eager"], strict=True):
        assert cosine(a, b) >= 0.99


def test_graph_buckets():
    assert [graph_bucket(n) for n in (1, 2, 3, 5, 9, 17, 33, 65, 256)] == [1, 2, 4, 8, 16, 24, 48, 96, 256]
    assert graph_bucket(GRAPH_BUCKETS[-1] + 1) is None


def test_padded_decode_step_equals_the_reference(tmp_path):
    # The step CUDA graphs capture, run eagerly: rows padded to buckets, filler rows in free slots, attention
    # over the pool's whole capacity. Sequences join and leave, so buckets change and the pool grows.
    worker = start_worker(gircse_spec(make_tiny_llama(tmp_path), dtype="float64"), max_running_seqs=8)
    runner = worker.method.runner
    runner.graphs = DecodeGraphs(runner, capture=False)
    try:
        cases = [
            (f"{t} {i}", k)
            for i, (t, k) in enumerate(zip(TEXTS * 4, [7, 1, 12, 3, 5, 9, 2, 20, 4, 6, 11, 8], strict=True))
        ]
        items = [EmbedItem(text=t, input_type="document", steps=k) for t, k in cases]
        got = embed_all(worker, items)
        assert len(runner.graphs.graphs) >= 2  # several buckets ran
        tokenizer, model = worker.loaded.tokenizer, worker.loaded.model
        for vector, (text, k) in zip(got, cases, strict=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert 1 - cosine(vector, reference_gircse(model, ids, k)) <= 1e-10
    finally:
        worker.stop()


def test_fused_projections_keep_the_models_own_forward(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from model_server.runners.fast import FusedLinear, FusedPart, fuse_projections

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path), dtype=torch.float64).eval()
    fused = copy.deepcopy(model)
    fuse_projections(fused.get_decoder())
    fuse_projections(fused.get_decoder())  # idempotent
    attn = fused.get_decoder().layers[0].self_attn
    assert type(attn.qkv_proj) is FusedLinear and type(attn.q_proj) is FusedPart
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([[5, 17, 300, 9, 41, 7]])
    with torch.inference_mode():
        want, got = model(ids).logits, fused(ids).logits
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_familys_own_bit_for_bit(dtype):
    """Decode rows, prefill rows and a qwen3 q/k norm's [tokens, heads, head_dim]: every element as the module's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from model_server.runners.fast import rms_norm

    torch.manual_seed(0)
    for shape in [(16, 576), (1664, 576), (37, 4, 64)]:
        norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
        norm.weight.data = torch.randn(shape[-1], dtype=dtype) * 0.1 + 1
        x = torch.randn(shape, dtype=dtype) * 3
        with torch.inference_mode():
            got, want = rms_norm(norm, x), norm(x)
        assert got.dtype == dtype and torch.equal(got, want), (shape, (got != want).sum().item())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rotary_equals_the_familys_own(dtype, tolerance):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from model_server.runners.fast import _rotate

    torch.manual_seed(0)
    q, k = torch.randn(37, 4, 16, dtype=dtype), torch.randn(37, 2, 16, dtype=dtype)
    cos, sin = torch.randn(37, 16, dtype=dtype), torch.randn(37, 16, dtype=dtype)
    with torch.inference_mode():
        # The family's own takes [batch, heads, tokens, head_dim]
        want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        pairs = [(_rotate(q, cos, sin), want_q[0].transpose(0, 1)), (_rotate(k, cos, sin), want_k[0].transpose(0, 1))]
    for got, want in pairs:
        assert got.dtype == dtype and got.shape == want.shape
        assert (got.double() - want.double()).abs().max() <= tolerance * want.double().abs().max()


@pytest.mark.parametrize(
    ("dtype", "tolerance", "gemms"),
    [
        (torch.float32, 1e-5, "native"),
        (torch.bfloat16, 2e-2, "native"),
        (torch.bfloat16, 2e-2, "fp32"),
        (torch.float32, 1e-5, "genembed"),
        (torch.bfloat16, 2e-2, "genembed"),
    ],
)
def test_epilogues_equal_the_plain_ops(dtype, tolerance, gemms, request):
    from model_server.runners.packed import gated_product, linear_plus

    if gemms == "fp32":
        request.getfixturevalue("fp32_gemms")
    elif gemms == "native" and dtype == torch.bfloat16 and not BF16_PACKS:
        pytest.skip("this CPU has no bf16 GEMM to pack for (the fp32 case covers it)")
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(*shape).to(dtype) for shape in ((48, 96), (48, 96), (96, 48)))
    gemm = _gemm("genembed" if gemms == "genembed" else "onednn")
    packed = [PackedLinear.of(linear, gemm) for linear in (gate, up, down)]
    x, residual = torch.randn(16, 48, dtype=dtype), torch.randn(16, 48, dtype=dtype)
    act = torch.nn.SiLU()
    with torch.inference_mode():
        want = linear_plus(down, gated_product(gate, up, act, True, x), residual)
        assert (want.float() - (residual + down(act(gate(x)) * up(x))).float()).abs().max() == 0  # the plain path
        got = linear_plus(packed[2], gated_product(packed[0], packed[1], act, True, x), residual)
    assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


def test_prefill_rows_pad_little_and_bound_the_shapes():
    from model_server.runners.fast import prefill_rows

    padded = [prefill_rows(rows) for rows in range(1, 8193)]
    assert all(0 <= p - rows < max(8, rows / 8) for rows, p in enumerate(padded, start=1))  # under 1/8 more, or 8
    assert len(set(padded)) <= 8 * 13  # eight shapes per octave
