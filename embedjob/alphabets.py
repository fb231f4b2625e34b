"""Residue alphabets the models accept (no torch here: the index step and the operator use it).

Protein: the letters of fair-esm's ESM-1b/ESM-2 alphabet (``esm.data.Alphabet`` standard
tokens): the 20 standard amino acids plus X (unknown), B (D/N), Z (E/Q), U (selenocysteine)
and O (pyrrolysine). ESM's alphabet also has the alignment gaps '.' and '-', but they mean
"no residue here": embedding an aligned row gives a different vector than the protein, so
they are refused with a hint to ungap. Gene callers (Prodigal, pyrodigal, EMBOSS transeq)
end translations with a stop '*': a single trailing '*' is stripped; any other '*' is an
error (an internal stop codon is a translation problem, not a residue).

DNA: A C G T and N (DNABERT-S and other genomic encoders tokenise these; IUPAC ambiguity
codes and RNA's U are refused with a hint). Lower case (soft-masking) is upper-cased.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from embedjob.failures import ConfigError, InputError
from embedjob.spec import Alphabet as AlphabetName
from embedjob.spec import EmbeddingJobSpec


@dataclass(frozen=True)
class Alphabet:
    """The letters a model accepts (upper case) and how to read a record's end."""

    name: str
    letters: frozenset[str]
    strip_stop: bool = False  # drop one trailing '*' (a translated stop codon)
    hint: str = ""  # appended to invalid-residue errors

    def __contains__(self, letter: object) -> bool:
        return letter in self.letters

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.letters))

    def __len__(self) -> int:
        return len(self.letters)

    @property
    def display(self) -> str:
        return "".join(sorted(self.letters))


PROTEIN = Alphabet(
    name="protein",
    letters=frozenset("ACDEFGHIKLMNPQRSTVWY" + "XBUZO"),
    strip_stop=True,
    hint="use the 20 amino acids or X/B/Z/U/O; ungap alignments ('-', '.'); "
    "a stop '*' is allowed only at the end",
)

DNA = Alphabet(
    name="dna",
    letters=frozenset("ACGTN"),
    hint="use A/C/G/T/N (replace IUPAC ambiguity codes with N; RNA's U with T)",
)

_BY_NAME = {PROTEIN.name: PROTEIN, DNA.name: DNA}
_DNA_MODELS = frozenset({"dnabert-s", "zhihan1996/dnabert-s"})


DNA_SHARE = 0.9
"""Protein residues are about a quarter A/C/G/T/N; an input this much A/C/G/T/N is DNA."""
MIN_RESIDUES_TO_JUDGE = 50


def check_fits(spec: EmbeddingJobSpec, alphabet: Alphabet, nucleotides: int,
               residues: int) -> None:
    """Refuse DNA given to a protein model (it would embed silently as a protein made of
    Ala/Cys/Gly/Thr/Asn) unless ``input.alphabet: protein`` says it is meant."""
    if alphabet is not PROTEIN or spec.input.alphabet is not None:
        return
    if residues < MIN_RESIDUES_TO_JUDGE or nucleotides < DNA_SHARE * residues:
        return
    raise InputError(
        f"the input looks like DNA ({100 * nucleotides / residues:.0f}% of residues are "
        f"A/C/G/T/N) but {spec.model.name} reads proteins: use a DNA model (dnabert-s), "
        "translate the input, or set input.alphabet: protein to embed it as protein anyway"
    )


def by_name(name: str) -> Alphabet:
    """``protein`` or ``dna``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown alphabet {name!r}: use protein or dna") from None


def alphabet_for(spec: EmbeddingJobSpec) -> Alphabet:
    """``input.alphabet`` if set, else the model's own: ESM-2 reads protein, DNABERT-S DNA."""
    if spec.input.alphabet is not None:
        return by_name(AlphabetName(spec.input.alphabet).value)
    if spec.model.is_esm2:
        return PROTEIN
    if spec.model.name.lower() in _DNA_MODELS:
        return DNA
    raise ConfigError(
        f"cannot tell which alphabet model {spec.model.name} reads: set input.alphabet "
        "to protein or dna"
    )
