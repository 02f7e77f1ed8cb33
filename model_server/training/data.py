"""Training data this machine has offline: Debian package descriptions.

Debian: every binary package has a one-line synopsis and a long description. A pair is (query =
synopsis, document = long description). `apt-cache dumpavail` gives the packages; where the archive
splits long descriptions into Translation-en files (Debian does; docker images skip them), they are
joined in by Description-md5, as apt does. Build the pairs with

    apt-get update -o Acquire::Languages=en      # root; fetches the Translation-en files
    python -m model_server.training.data --out data/debian

which writes train.jsonl and heldout.jsonl (not committed: they are derived from the archive).
The Lee evaluation sets and ranking metrics live in evaluation/lee.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: synopses of packages that only exist to pull in another: not descriptions of anything
_PLACEHOLDER = re.compile(r"\b(transitional|dummy)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


@dataclass(frozen=True)
class Package:
    name: str
    source: str
    synopsis: str
    description: str


def parse_deb822(text: str) -> Iterator[dict[str, str]]:
    """Stanzas of a Debian control file; a field's continuation lines are kept, one per line."""
    stanza: dict[str, str] = {}
    field = None
    for line in text.splitlines():
        if not line.strip():
            if stanza:
                yield stanza
            stanza, field = {}, None
        elif line[0] in " \t" and field is not None:
            stanza[field] += "\n" + line
        elif ":" in line:
            field, _, value = line.partition(":")
            stanza[field] = value.strip()
    if stanza:
        yield stanza


def long_description(lines: Iterable[str]) -> str:
    """Debian's long-description markup to plain text: ` .` separates paragraphs, wrapped lines
    (one leading space) join into one, lines indented further (lists, code) stay lines of their own."""
    paragraphs: list[list[str]] = [[]]
    for raw in lines:
        line = raw[1:] if raw[:1] in (" ", "\t") else raw
        if line.strip() == ".":
            paragraphs.append([])
        elif line[:1] in (" ", "\t") or not paragraphs[-1]:
            paragraphs[-1].append(line.strip())
        else:
            paragraphs[-1][-1] += " " + line.strip()
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def _split_description(value: str) -> tuple[str, str]:
    first, *rest = value.split("\n")
    return first.strip(), long_description(rest)


def packages_from_text(available: str, translations: str = "") -> list[Package]:
    """Packages from `apt-cache dumpavail` output, with long descriptions from Translation-en text
    (matched by Description-md5) where the Packages records carry only the synopsis."""
    long_by_md5: dict[str, str] = {}
    for stanza in parse_deb822(translations):
        if "Description-en" in stanza and "Description-md5" in stanza:
            long_by_md5[stanza["Description-md5"]] = _split_description(stanza["Description-en"])[1]
    packages: dict[str, Package] = {}
    for stanza in parse_deb822(available):
        if "Package" not in stanza or "Description" not in stanza:
            continue
        synopsis, description = _split_description(stanza["Description"])
        description = description or long_by_md5.get(stanza.get("Description-md5", ""), "")
        source = stanza.get("Source", stanza["Package"]).split(" ")[0]
        packages.setdefault(stanza["Package"], Package(stanza["Package"], source, synopsis, description))
    return list(packages.values())


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, errors="replace").stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"the Debian pairs need apt's package lists (Debian/Ubuntu): {' '.join(cmd)}: {exc}") from exc


def packages_from_apt() -> list[Package]:
    """This machine's package lists through apt's own tools (any index compression apt reads)."""
    available = _run(["apt-cache", "dumpavail"])
    query = ["-o", "Acquire::Languages=en", "--format", "$(FILENAME)", "Identifier: Translations"]
    targets = _run(["apt-get", "indextargets", *query])
    files = [f for f in targets.split() if Path(f).is_file()]
    translations = "\n\n".join(_run(["/usr/lib/apt/apt-helper", "cat-file", f]) for f in files)
    packages = packages_from_text(available, translations)
    if not any(p.description for p in packages):
        raise SystemExit(
            "apt's package lists carry no long descriptions here; fetch the Translation-en files first:\n"
            "  apt-get update -o Acquire::Languages=en"
        )
    return packages


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


def _in_heldout(source: str, fraction: float, seed: int) -> bool:
    """A stable split by source package: siblings (libfoo1, libfoo-dev) share descriptions, so they
    land on the same side; a hash, not a shuffle, so archive updates do not move other packages."""
    digest = hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def build_pairs(
    packages: list[Package],
    heldout_fraction: float = 0.02,
    seed: int = 0,
    min_description_chars: int = 100,
    negatives: int = 3,
) -> tuple[list[dict], list[dict]]:
    """(train, heldout) pairs. Drops placeholder packages, descriptions shorter than
    `min_description_chars`, and duplicates: a synopsis or a description seen before (in package
    name order) would make a query with two right answers. `negatives`: up to that many hard
    negatives per pair, the descriptions of other packages built from the same source."""
    seen_synopses: set[str] = set()
    seen_descriptions: set[str] = set()
    kept: list[Package] = []
    for package in sorted(packages, key=lambda p: p.name):
        synopsis, description = _normalised(package.synopsis), _normalised(package.description)
        if len(package.description) < min_description_chars or not synopsis or _PLACEHOLDER.search(synopsis):
            continue
        if synopsis in seen_synopses or description in seen_descriptions:
            continue
        seen_synopses.add(synopsis)
        seen_descriptions.add(description)
        kept.append(package)
    by_source: dict[str, list[Package]] = defaultdict(list)
    for package in kept:
        by_source[package.source].append(package)
    rng = random.Random(seed)
    train: list[dict] = []
    heldout: list[dict] = []
    for package in kept:
        siblings = [p.description for p in by_source[package.source] if p is not package]
        row = {
            "id": package.name,
            "query": package.synopsis,
            "document": package.description,
            "negatives": rng.sample(siblings, min(negatives, len(siblings))),
        }
        (heldout if _in_heldout(package.source, heldout_fraction, seed) else train).append(row)
    return train, heldout


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build Debian (synopsis, description) pairs from apt's lists.")
    parser.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and heldout.jsonl")
    parser.add_argument("--heldout-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="decides the held-out split and the negatives")
    parser.add_argument("--min-description-chars", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives per pair (same source package)")
    args = parser.parse_args(argv)
    train, heldout = build_pairs(
        packages_from_apt(), args.heldout_fraction, args.seed, args.min_description_chars, args.negatives
    )
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"{len(train)} training pairs, {len(heldout)} held out -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
