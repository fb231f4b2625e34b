"""Regenerate examples/data/proteins.fa: real proteins predicted by pyrodigal.

The bacterial genome of strain NCTC11397 (RefSeq GCF_001457455.1) ships in the pyrodigal wheel's
test data, so this runs offline. pyrodigal trains on the genome itself (single mode), then
every k-th predicted gene is kept so the sample spans the chromosome with its natural
length distribution (median ~270 aa, a few longer than ESM-2's 1022-residue window).
Deterministic: same pyrodigal version, same file. Usage: python tools/make_proteins.py [OUT]
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pyrodigal

GENOME = "GCF_001457455.1_NCTC11397_genomic.fna.gz"
COUNT = 300
WIDTH = 60


def read_genome(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return b"".join(line.strip() for line in f if not line.startswith(b">"))


def predict(genome: bytes) -> list[str]:
    finder = pyrodigal.GeneFinder()
    finder.train(genome)
    return [gene.translate().rstrip("*") for gene in finder.find_genes(genome)]


def main(out: str = "examples/data/proteins.fa") -> None:
    data = Path(pyrodigal.__file__).parent / "tests" / "data" / GENOME
    proteins = predict(read_genome(data))
    step = len(proteins) // COUNT
    chosen = [(i, proteins[i]) for i in range(0, step * COUNT, step)]
    lines = []
    for i, seq in chosen:
        lines.append(f">NCTC11397_{i + 1:04d} pyrodigal gene {i + 1} length={len(seq)}")
        lines.extend(seq[j : j + WIDTH] for j in range(0, len(seq), WIDTH))
    Path(out).write_text("\n".join(lines) + "\n")
    lengths = sorted(len(s) for _, s in chosen)
    print(
        f"{out}: {len(chosen)} proteins, median {lengths[len(lengths) // 2]} aa, "
        f"max {lengths[-1]} aa, {sum(n > 1022 for n in lengths)} longer than 1022"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
