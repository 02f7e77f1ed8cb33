"""Batched forward passes of a Llama-family decoder over a slot-based KV cache (the model runner).

Why not `model(..., past_key_values=...)`: continuous batching needs sequences of different
lengths to join and leave a batch every iteration. Here each running sequence owns a *slot* (a
row of a preallocated KV tensor per layer); slots stay dense (0..n-1, a leaving sequence is
replaced by the last one) so a decode step attends over a view of the pool with no copies.
Prefill packs the new prompts end to end, so projections and MLPs never see padding.

The weights are Hugging Face's own modules, except that each layer's q, k and v projections become one
(`FusedLinear`; the model's own forward still computes the same). The arithmetic between them is the family's,
in fewer passes: RMSNorm and rotary here, the MLP's activation and product and the residual sums in the packed
GEMMs' epilogues (`packed`). SmolLM2 bf16 on the 2-core Xeon, against calling the modules as they are: a pooled
prefill of 64 prompts 1.28x, a 16-row decode step 1.03-1.07x. A one-pass encoder (a pooled decoder) runs the same
layers packed with no KV (`encode`). Supports llama, mistral, qwen2 and qwen3 layouts (`FAMILIES`); other
families run on `hf.HFRunner`.

On CUDA a step that only decodes can replay a CUDA graph (`DecodeGraphs`): the step's rows are padded to a
bucket (1, 2, 4, 8, 16, ...) and attend over the pool's whole capacity under a mask, so its shapes and
addresses stay fixed while the batch changes; the kernels of all layers launch as one graph instead of one
Python call each. Steps with new prompts, and every step on the CPU, run eagerly. On the CPU, attention (decode
and prefill), RMSNorm and rotary run in genembed's own compiled kernels (`cpu_kernels`) where they build, unless
the spec asks for torch's; on AVX2-only CPUs so do the packed projections' GEMMs (`packed.own_gemm`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model_server.runners.base import Runner
from model_server.runners.cpu_kernels import MAX_GROUP, MAX_HEAD_DIM, CpuKernels
from model_server.runners.cpu_kernels import cpu_kernels as built_kernels
from model_server.runners.packed import gated_product, linear_plus

log = logging.getLogger(__name__)

#: `config.model_type`s whose layout this runner implements
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [..., tokens, heads, head_dim] with cos/sin of [tokens, head_dim]: `x * cos +
    rotate_half(x) * sin` as the family computes it, in three passes instead of six (no rotated copy; the
    multiply-adds round once where the family rounds twice). Where genembed's CPU kernels are off or cannot build
    (`cpu_kernels.rope` is one pass, bit for bit the family's), and on CUDA."""
    half = x.shape[-1] // 2
    out = x * cos.unsqueeze(-2)
    out[..., :half].addcmul_(x[..., half:], sin[..., None, :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., None, half:])
    return out


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm module's function, rounded as it rounds: `x / rms(x)` computed in fp32 (or wider) and
    rounded to x's dtype, then times the weight in that dtype. torch's own op does the first part
    (two ops where widening by hand took nine), and its result equals the family's bit for bit (bf16 and fp32; the
    hand-written reduction it replaced differed in the last bit of up to a fifth of the elements). A 16-row bf16
    decode step's norm: 12.7 against 16.5 µs; prefill's [1664, 576] level in bf16, 253 against 194 µs in fp32
    (2-core AMD EPYC Zen 5, alternating). The runner's norm where genembed's CPU kernels are off or cannot build
    (`cpu_kernels` has one pass per row instead), and on CUDA."""
    return F.rms_norm(x, x.shape[-1:], eps=norm.variance_epsilon).mul_(norm.weight)


class FusedLinear(torch.nn.Module):
    """A layer's q, k and v projections as one GEMM: at decode's small row counts a call's fixed cost is most of
    it (bf16, 16 rows: 77 µs as three calls, 36 µs as one). Returns the three as views. The model's own forward
    still finds `q_proj`, `k_proj` and `v_proj` (`FusedPart`)."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        biased = linears[0].bias is not None
        if any((linear.bias is not None) != biased for linear in linears):
            raise ValueError("fused projections need a bias on all or none of them")
        self.proj = torch.nn.Linear(linears[0].in_features, sum(self.sizes), bias=biased, device="meta")
        self.proj.weight = torch.nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
        if biased:
            self.proj.bias = torch.nn.Parameter(torch.cat([linear.bias for linear in linears]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x).split(self.sizes, dim=-1)


class FusedPart(torch.nn.Module):
    """One part of a `FusedLinear` where the model's own forward calls it (the tests' reference): the whole GEMM,
    one part kept. The fused module is held outside the module tree, so its weight is packed and counted once."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self.index = index
        self.fused = (fused,)  # a tuple: not registered as a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0](x)[self.index]


def fuse_projections(decoder: torch.nn.Module) -> None:
    """Each layer's q, k and v projections as one `FusedLinear` (`qkv_proj`), in place; the model's own forward
    computes the same through `FusedPart`s. Idempotent."""
    names = ("q_proj", "k_proj", "v_proj")
    with torch.no_grad():
        for layer in decoder.layers:
            attn = layer.self_attn
            if not hasattr(attn, "qkv_proj"):
                attn.qkv_proj = FusedLinear([getattr(attn, name) for name in names])
                for index, name in enumerate(names):
                    setattr(attn, name, FusedPart(attn.qkv_proj, index))


#: prompts are grouped for attention while padding stays within this factor of their real tokens
MAX_PADDING_RATIO = 1.25
#: the decode batch sizes captured as CUDA graphs: a step of n rows replays the smallest bucket >= n
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def prefill_rows(rows: int) -> int:
    """The row count a pass with prompts is padded to: the next multiple of an eighth of the largest power of two
    not above `rows` (at least 8), so at most 1/8 more rows and eight shapes per octave. Exact row counts made a
    new oneDNN kernel and buffer per pass: +1068 MB of RSS over 150 random-length batches of minilm-l6 (`pooled`)."""
    quantum = max(8, (1 << (rows.bit_length() - 1)) // 8)
    return -(-rows // quantum) * quantum


def graph_bucket(rows: int) -> int | None:
    """The padded batch size a decode step of `rows` replays, None past the largest bucket (it runs eagerly)."""
    return next((b for b in GRAPH_BUCKETS if b >= rows), None)


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest member costs little."""
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[index]
        if groups and (len(groups[-1]) + 1) * n <= MAX_PADDING_RATIO * (real + n):
            groups[-1].append(index)
            real += n
        else:
            groups.append([index])
            real = n
    return groups


@dataclass
class PrefillGroup:
    """Index tensors that gather a group of packed prompts into a right-padded batch (built once per pass)."""

    members: torch.Tensor  # [n] prompt indices
    rows: torch.Tensor  # [n, width] packed row of each position (0 where padded)
    valid: torch.Tensor  # [n, width] real positions


@dataclass
class Prompts:
    """A pass's new prompts, packed end to end after its decode rows."""

    starts: torch.Tensor  # [prompts + 1] int64 on the host: where each begins among the prompt rows, then the end
    first_slot: int | None  # the slot of the first, the rest following; None: they keep no KV (`encode`)
    groups: list[PrefillGroup]  # built where they are read: SDPA attends by group, and kept prompts fill slots by one


class DecoderRunner(Runner):
    """Owns the KV pool: a preallocated K and V tensor per layer, a row per slot."""

    kind = "fast"

    def __init__(
        self,
        causal_lm: torch.nn.Module,
        max_seqs: int,
        attention: str = "auto",
        cuda_graphs: bool = False,
        cpu_kernels: bool = False,
    ) -> None:
        super().__init__(causal_lm)
        self.decoder = causal_lm.get_decoder()
        fuse_projections(self.decoder)
        config = causal_lm.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_seqs = max_seqs
        self.silu = config.hidden_act in ("silu", "swish")  # the MLPs' activation
        weight = causal_lm.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        # A factory: a kernel-selection context manager can be entered only once.
        math = attention == "eager"
        self._kernel = functools.partial(sdpa_kernel, SDPBackend.MATH) if math else contextlib.nullcontext
        self.kernels: CpuKernels | None = built_kernels() if cpu_kernels and self.device.type == "cpu" else None
        # SDPA's math kernel, where asked for, stays the decode path too; so do heads beyond the kernel's bounds
        fits = self.head_dim <= MAX_HEAD_DIM and self.n_heads // self.n_kv <= MAX_GROUP
        self._decode_kernel = self.kernels.decode_attention if self.kernels and fits and not math else None
        self._prefill_kernel = self.kernels.prefill_attention if self.kernels and fits and not math else None
        # whether a pass with prompts pads its rows to a bounded set of counts (`prefill_rows`): oneDNN keeps a
        # kernel per shape; genembed's own GEMM keeps none (set where the layers are packed, `fast_runner`)
        self.pads_rows = True
        self.scale = self.head_dim**-0.5  # SDPA's default, which the family's attention uses
        n_layers = len(self.decoder.layers)
        self.keys: list[torch.Tensor] = [self._empty(0, 0)] * n_layers
        self.values: list[torch.Tensor] = [self._empty(0, 0)] * n_layers
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.host_lengths: list[int] = []  # `lengths` on the host: a step's span costs no device sync
        self.pool_version = 0  # bumped whenever the pool is reallocated (captured graphs hold its addresses)
        self.graphs = DecodeGraphs(self, capture=True) if cuda_graphs and self.device.type == "cuda" else None

    # -- pool bookkeeping ----------------------------------------------------------------------

    def _empty(self, rows: int, cap: int) -> torch.Tensor:
        return torch.zeros(rows, self.n_kv, cap, self.head_dim, dtype=self.dtype, device=self.device)

    def _reserve(self, rows: int, cap: int) -> None:
        """Grow the pool (doubling) so it holds `rows` slots of `cap` positions."""
        have_rows, have_cap = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= have_rows and cap <= have_cap:
            return
        new_rows = min(max(rows, 2 * have_rows), max(self.max_seqs, rows))
        new_cap = max(cap, have_cap if cap <= have_cap else 2 * have_cap)
        used = self.size
        for pool in (self.keys, self.values):
            for i, old in enumerate(pool):
                grown = self._empty(new_rows, new_cap)
                grown[:used, :, :have_cap] = old[:used]
                pool[i] = grown
        self.pool_version += 1

    def _move(self, source: int, target: int) -> None:
        n = self.host_lengths[source]
        for pool in (self.keys, self.values):
            for layer in pool:
                layer[target, :, :n] = layer[source, :, :n]
        self.lengths[target] = self.lengths[source]
        self.host_lengths[target] = n

    def _truncate(self, size: int) -> None:
        self.lengths = self.lengths[:size]
        self.host_lengths = self.host_lengths[:size]

    # -- forward passes -------------------------------------------------------------------------

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return rms_norm(norm, x)
        return self.kernels.rms_norm(x, norm.weight, norm.variance_epsilon)

    def _project(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v for tokens x [T, H] with rotary (cos/sin [T, head_dim]) applied: [T, heads, head_dim]."""
        t = x.shape[0]
        q, k, v = attn.qkv_proj(x)
        q, k, v = q.view(t, self.n_heads, self.head_dim), k.view(t, self.n_kv, self.head_dim), v.view(t, self.n_kv, -1)
        if hasattr(attn, "q_norm"):  # qwen3
            q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
        if self.kernels is None:
            return _rotate(q, cos, sin), _rotate(k, cos, sin), v
        return self.kernels.rope(q, cos, sin), self.kernels.rope(k, cos, sin), v

    def _prompts(self, lengths: list[int], first_slot: int | None) -> Prompts | None:
        if not lengths:
            return None
        starts = list(itertools.accumulate(lengths, initial=0))
        gather = first_slot is not None or self._prefill_kernel is None
        return Prompts(torch.tensor(starts), first_slot, self._prefill_groups(lengths, starts) if gather else [])

    def _prefill_groups(self, lengths: list[int], starts: list[int]) -> list[PrefillGroup]:
        groups = []
        for members in group_by_length(lengths):
            width = max(lengths[i] for i in members)
            offsets = torch.arange(width, device=self.device)
            sizes = torch.tensor([lengths[i] for i in members], device=self.device)
            valid = offsets[None, :] < sizes[:, None]
            rows = torch.tensor([starts[i] for i in members], device=self.device)[:, None] + offsets[None, :]
            members_t = torch.tensor(members, device=self.device)
            groups.append(PrefillGroup(members=members_t, rows=torch.where(valid, rows, 0), valid=valid))
        return groups

    def _decode_mask(self, positions: torch.Tensor, span: int) -> torch.Tensor | None:
        """[n, 1, 1, span]: which of its slot's first `span` positions each decode row sees (built once a step);
        None where the decode kernel attends (it reads the positions themselves)."""
        if self._decode_kernel is not None:
            return None
        return (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]

    def _attend_decode(
        self, layer: int, q, k, v, positions: torch.Tensor, visible: torch.Tensor | None
    ) -> torch.Tensor:
        """Rows 0..n-1 (one new token each) attend over their slot's cached positions (`visible`)."""
        n = len(positions)
        keys, values = self.keys[layer], self.values[layer]
        # Grouped-query attention without repeating K/V: a kv head's query heads form the query axis.
        grouped = q.view(n, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        if self._decode_kernel is not None:  # it writes the new K and V too
            return self._decode_kernel(grouped, k, v, keys, values, positions, self.scale).view(n, -1)
        rows, span = torch.arange(n, device=self.device), visible.shape[-1]
        keys[rows, :, positions] = k
        values[rows, :, positions] = v
        with self._kernel():
            out = F.scaled_dot_product_attention(grouped, keys[:n, :, :span], values[:n, :, :span], attn_mask=visible)
        return out.reshape(n, -1)

    def _attend_prefill(self, layer: int, q, k, v, prompts: Prompts) -> torch.Tensor:
        """New prompts (packed end to end) attend causally to themselves and fill their slots (unless they keep no
        KV).

        genembed's kernel attends over the packed rows as they are. Through SDPA, prompts of similar length form a
        group that runs as one padded attention call; padding
        exists only inside attention, whose cost is small beside the projections. The padding is on the right, so
        the causal mask alone is exact for every real position (it never sees the padding after it), and SDPA gets
        no mask tensor: on CUDA that lets it pick its flash kernel, which takes none (not measured here: no GPU). On
        the 2-core Xeon, against the padded mask it replaced: the same vectors, level in time (0.93-1.03x per pair
        of processes, 32 prompts of ~52 tokens and 8 of ~475, bf16). K and V are repeated per query head
        (`enable_gqa` needs torch 2.5).
        """
        group_size, first_slot = self.n_heads // self.n_kv, prompts.first_slot
        if self._prefill_kernel is not None:
            if first_slot is not None:
                for g in prompts.groups:
                    self._fill_slots(
                        layer, first_slot + g.members, k[g.rows].transpose(1, 2), v[g.rows].transpose(1, 2)
                    )
            grouped = q.view(len(q), self.n_kv, group_size, self.head_dim)  # a kv head's query heads together
            return self._prefill_kernel(grouped, k, v, prompts.starts, self.scale).view(len(q), -1)
        out = q.new_zeros(q.shape[0], self.n_heads * self.head_dim)  # padding rows (`prefill_rows`) stay 0
        for g in prompts.groups:
            n, width = g.rows.shape
            kg, vg = k[g.rows].transpose(1, 2), v[g.rows].transpose(1, 2)  # [n, kv, width, d]
            if first_slot is not None:
                self._fill_slots(layer, first_slot + g.members, kg, vg)
            if group_size > 1:
                kg, vg = kg.repeat_interleave(group_size, dim=1), vg.repeat_interleave(group_size, dim=1)
            with self._kernel():
                attended = F.scaled_dot_product_attention(q[g.rows].transpose(1, 2), kg, vg, is_causal=True)
            out[g.rows[g.valid]] = attended.transpose(1, 2).reshape(n, width, -1)[g.valid]
        return out

    def _fill_slots(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A group's K and V [n, kv, width, d] into its slots' first `width` positions."""
        width = keys.shape[2]
        self.keys[layer][slots, :, :width] = keys
        self.values[layer][slots, :, :width] = values

    def _forward(
        self, decode_inputs: torch.Tensor | None, prompts: list[torch.Tensor], capacities: list[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """All tokens, decode rows and packed prompts, share the projections and MLPs of one batch."""
        n_dec = 0 if decode_inputs is None else len(decode_inputs)
        graphed = self.graphs is not None and self.graphs.enabled and not prompts
        if graphed and n_dec and graph_bucket(n_dec) is not None:
            decoded = self.graphs.step(decode_inputs, self.lengths)
            self.lengths = self.lengths + 1
            self.host_lengths = [n + 1 for n in self.host_lengths]
            return decoded, []
        lengths = [p.shape[0] for p in prompts]
        if prompts:
            self._reserve(self.size + len(prompts), max(capacities))
        dec_positions = self.lengths.clone()
        positions = torch.cat([dec_positions, *(torch.arange(n, device=self.device) for n in lengths)])
        hidden = torch.cat(([] if decode_inputs is None else [decode_inputs]) + prompts)
        visible = self._decode_mask(dec_positions, max(self.host_lengths) + 1) if n_dec else None
        hidden = self._layers(hidden, positions, n_dec, visible, self._prompts(lengths, first_slot=n_dec))
        self.lengths = torch.cat([dec_positions + 1, torch.tensor(lengths, dtype=torch.long, device=self.device)])
        self.host_lengths = [n + 1 for n in self.host_lengths] + lengths
        return (hidden[:n_dec] if n_dec else None), list(hidden[n_dec:].split(lengths))

    @torch.inference_mode()
    def encode(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final-layer states [n_i, H] of prompts [n_i, H] in one packed pass that keeps no KV: a one-pass encoder
        (a pooled decoder, DEBATER) pays neither padding in its projections nor a cache it never reads."""
        lengths = [p.shape[0] for p in prompts]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        hidden = self._layers(torch.cat(prompts), positions, 0, None, self._prompts(lengths, first_slot=None))
        return list(hidden.split(lengths))

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        n_dec: int,
        visible: torch.Tensor | None,
        prompts: Prompts | None,
    ) -> torch.Tensor:
        """All layers and the final norm over packed rows: `n_dec` decode rows (attending under `visible`), then
        the `prompts`, which fill the slots after the running ones (unless they keep no KV)."""
        rows = len(hidden)
        if prompts is not None and self.pads_rows:  # padded rows give oneDNN a bounded set of shapes
            extra = prefill_rows(rows) - rows
            hidden, positions = F.pad(hidden, (0, 0, 0, extra)), F.pad(positions, (0, extra))
        cos, sin = (t[0] for t in self.decoder.rotary_emb(hidden[None], positions[None]))
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            q, k, v = self._project(attn, self._norm(layer.input_layernorm, hidden), cos, sin)
            parts = []
            if n_dec:
                parts.append(self._attend_decode(index, q[:n_dec], k[:n_dec], v[:n_dec], positions[:n_dec], visible))
            if prompts is not None:
                parts.append(self._attend_prefill(index, q[n_dec:], k[n_dec:], v[n_dec:], prompts))
            hidden = linear_plus(attn.o_proj, torch.cat(parts) if len(parts) > 1 else parts[0], hidden)
            mlp, normed = layer.mlp, self._norm(layer.post_attention_layernorm, hidden)
            gated = gated_product(mlp.gate_proj, mlp.up_proj, mlp.act_fn, self.silu, normed)
            hidden = linear_plus(mlp.down_proj, gated, hidden)
        return self._norm(self.decoder.norm, hidden)[:rows]


@dataclass
class _Graph:
    """A decode step of a fixed padded batch size: its static input, position and output buffers, and the
    captured graph that reads and writes them (None where nothing is captured: the CPU, tests)."""

    inputs: torch.Tensor  # [bucket, H]
    positions: torch.Tensor  # [bucket]
    output: torch.Tensor | None = None  # [bucket, H], written by each replay
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode steps replayed from CUDA graphs captured per padded batch size (`GRAPH_BUCKETS`).

    A step of n rows is padded to its bucket: the filler rows feed zeros at position 0 into the free slots
    after the running ones (the pool always has that many rows), and every row attends over the pool's whole
    capacity under its mask, so neither shapes nor addresses depend on the batch. A grown pool (new addresses)
    drops the graphs; they are captured again on first use. A capture that fails (a model whose step syncs
    with the host, such as dynamic rotary scaling) turns the graphs off for good: eager is the fallback.
    With `capture=False` the same padded step runs eagerly (the CPU, where tests check the padding).
    """

    def __init__(self, runner: DecoderRunner, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.graphs: dict[int, _Graph] = {}
        self.version = runner.pool_version
        self.enabled = True
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def step(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-layer states [n, H] of one decode step of rows [n, H] at `positions` [n] (slots 0..n-1); n > 0."""
        runner, n = self.runner, len(inputs)
        bucket = graph_bucket(n)
        if bucket is None:
            raise ValueError(f"{n} decode rows exceed the largest graph bucket ({GRAPH_BUCKETS[-1]})")
        runner._reserve(bucket, 0)  # filler rows write into free slots, which must exist
        if runner.pool_version != self.version:
            self.graphs.clear()
            self.version = runner.pool_version
        graph = self.graphs.get(bucket)
        fresh = graph is None
        if graph is None:
            hidden = runner.keys[0].new_zeros(bucket, inputs.shape[-1])
            graph = self.graphs[bucket] = _Graph(hidden, positions.new_zeros(bucket))
        graph.inputs[:n].copy_(inputs)
        graph.inputs[n:].zero_()
        graph.positions[:n].copy_(positions)
        graph.positions[n:].zero_()
        if not self.capture:
            return self._body(graph)[:n]
        if fresh:
            self._capture(graph)
        if graph.graph is None:  # the capture failed: this step (and all later ones) eagerly
            return self._body(graph)[:n]
        graph.graph.replay()
        return graph.output[:n].clone()

    def _body(self, graph: _Graph) -> torch.Tensor:
        runner = self.runner
        visible = runner._decode_mask(graph.positions, runner.keys[0].shape[2])
        return runner._layers(graph.inputs, graph.positions, len(graph.inputs), visible, None)

    def _capture(self, graph: _Graph) -> None:
        """Capture a bucket's step with the current step's inputs in its buffers. The warm-up runs execute
        that step for real, which is harmless: a step writes K/V only at its rows' current positions, and
        the same inputs write the same values again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body(graph)
            torch.cuda.current_stream().wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured, pool=self.pool):
                graph.output = self._body(graph)
            graph.graph = captured
        except RuntimeError:
            log.exception("capturing a decode graph failed: decode steps run eagerly from now on")
            self.enabled = False
