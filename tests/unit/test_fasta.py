"""FASTA reading: what is accepted, and a one-line fix-naming error for each bad input."""

from __future__ import annotations

import gzip
import io
import tracemalloc
from pathlib import Path

import pytest

from embedjob.alphabets import DNA, PROTEIN, alphabet_for
from embedjob.failures import ConfigError, InputError
from embedjob.spec import parse_spec
from embedjob.worker.fasta import MAX_SEQUENCE_LENGTH, Record, read_fasta, write_fasta


def read(data: bytes, alphabet=PROTEIN, source: str = "in.fa") -> list[Record]:
    return list(read_fasta(io.BytesIO(data), source, alphabet))


def error(data: bytes, alphabet=PROTEIN, source: str = "in.fa") -> str:
    with pytest.raises(InputError) as info:
        read(data, alphabet, source)
    message = str(info.value)
    assert "\n" not in message
    assert source in message or "in.fa" not in source
    return message


# --- accepted --------------------------------------------------------------------------------


def test_wrapped_lowercase_crlf_blank_lines_and_descriptions() -> None:
    data = b"\r\n>p1 some protein  [x]\r\nmkt\r\nAY\r\n\r\n>p2\r\nACDEF\r\n"
    assert read(data) == [Record("p1", "MKTAY"), Record("p2", "ACDEF")]


def test_no_final_newline_and_spaces_in_sequence() -> None:
    assert read(b">a\nAC DE\tF") == [Record("a", "ACDEF")]


def test_single_trailing_stop_is_stripped() -> None:
    assert read(b">a\nMKT\nAY*\n>b\nAC*\n") == [Record("a", "MKTAY"), Record("b", "AC")]


def test_gzip_detected_by_magic_not_name() -> None:
    data = gzip.compress(b">a\nACD\n>b\nEF\n")
    assert read(data, source="plain-looking.fa") == [Record("a", "ACD"), Record("b", "EF")]


def test_multi_member_gzip() -> None:
    data = gzip.compress(b">a\nACD\n") + gzip.compress(b">b\nEF\n")
    assert [r.id for r in read(data)] == ["a", "b"]


def test_dna_soft_masked_is_upper_cased() -> None:
    assert read(b">chr\nacgtNNacgt\n", DNA) == [Record("chr", "ACGTNNACGT")]


def test_a_bare_letter_set_works_as_alphabet() -> None:
    assert read(b">a\nab\n", frozenset("AB")) == [Record("a", "AB")]


def test_very_long_line_is_read_in_pieces() -> None:
    seq = b"ACDEFGHIKL" * 20_000  # 200 kB on one line, longer than a read piece
    assert read(b">long\n" + seq + b"\n")[0].seq == seq.decode()


def test_write_then_read_round_trip() -> None:
    records = [Record("a", "ACD" * 50), Record("b|x", "K")]
    for width in (0, 60):
        buffer = io.BytesIO()
        assert write_fasta(records, buffer, width=width) == 2
        assert read(buffer.getvalue()) == records


def test_real_proteins_read(proteins_fasta: Path) -> None:
    with proteins_fasta.open("rb") as f:
        records = list(read_fasta(f, str(proteins_fasta), PROTEIN))
    assert len(records) == 300
    assert len({r.id for r in records}) == 300
    assert sum(len(r.seq) > 1022 for r in records) >= 2


def _peak_reading(records: int) -> int:
    buffer = io.BytesIO()
    write_fasta(
        (Record(f"s{i}", "M" + "ACDEFGHIKLMNPQRSTVWY" * 15) for i in range(records)), buffer
    )
    buffer.seek(0)
    tracemalloc.start()
    try:
        assert sum(1 for _ in read_fasta(buffer, "big.fa", PROTEIN)) == records
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reader_streams_with_flat_memory() -> None:
    """Peak memory while reading does not grow with the number of records (8x here)."""
    small, large = _peak_reading(5_000), _peak_reading(40_000)  # ~1.5 MB vs ~12 MB of input
    assert large < small + 256 * 1024


# --- refused ---------------------------------------------------------------------------------


def test_empty_file() -> None:
    assert "is empty" in error(b"")
    assert "is empty" in error(b"\n\n  \n")


def test_not_fasta() -> None:
    message = error(b"hello world\nthis is text\n")
    assert "not FASTA" in message and "line 1" in message and "'>'" in message


def test_fastq_gets_a_hint() -> None:
    assert "FASTQ" in error(b"@r1\nACGT\n+\nIIII\n", DNA)


def test_binary_nul_bytes() -> None:
    message = error(b">a\nAC\x00\x01\x02")
    assert "binary" in message and "line 2" in message


def test_binary_file_without_header() -> None:
    assert "not FASTA" in error(b"\x89PNG\r\n\x1a\nrest")


def test_other_compression_named() -> None:
    import bz2

    assert "bzip2" in error(bz2.compress(b">a\nAC\n"))


def test_corrupt_gzip() -> None:
    data = gzip.compress(b">a\n" + b"ACDEFGHIKL" * 1000 + b"\n")
    message = error(data[: len(data) // 2])
    assert "gzip" in message and "re-create" in message


def test_invalid_utf8_header() -> None:
    assert "UTF-8" in error(b">caf\xe9\nACD\n")


def test_empty_id() -> None:
    message = error(b">a\nAC\n>\nDE\n")
    assert "empty id" in message and "line 3" in message


def test_empty_sequence() -> None:
    message = error(b">a\nAC\n>b desc\n\n>c\nDE\n")
    assert "'b'" in message and "empty" in message and "line 3" in message


def test_empty_last_sequence() -> None:
    assert "'z'" in error(b">a\nAC\n>z\n")


def test_invalid_residue_names_sequence_position_and_alphabet() -> None:
    message = error(b">ok\nACD\n>bad one\nACDEF\nGH1K\n")
    assert "'bad'" in message
    assert "line 5" in message
    assert "position 8" in message  # ACDEF + G H 1
    assert "'1'" in message and "protein" in message


def test_alignment_gap_is_refused_with_hint() -> None:
    assert "ungap" in error(b">a\nAC-DE\n")


def test_internal_stop_is_refused() -> None:
    message = error(b">a\nMK*TY\n")
    assert "position 3" in message and "'*'" in message
    message = error(b">a\nMKT*\nAY\n")  # a '*' that looked trailing until more followed
    assert "stop" in message and "position 4" in message and "line 2" in message


def test_double_stop_is_refused() -> None:
    assert "position 3" in error(b">a\nMK**\n")


def test_stop_is_not_dna() -> None:
    assert "dna" in error(b">a\nACGT*\n", DNA)


def test_dna_ambiguity_code_hint() -> None:
    message = error(b">a\nACGTRYACGT\n", DNA)
    assert "position 5" in message and "N" in message


def test_non_ascii_byte_in_sequence() -> None:
    assert "0xC3" in error(">a\nACé\n".encode())


def test_too_long_sequence_stops_early() -> None:
    line = b"A" * 60 + b"\n"
    lines = MAX_SEQUENCE_LENGTH // 60 + 2
    message = error(b">huge\n" + line * lines + b">next\nAC\n")
    assert "'huge'" in message and "longer than" in message


def test_overlong_id() -> None:
    assert "id longer" in error(b">" + b"x" * 5000 + b"\nAC\n")


# --- alphabets -------------------------------------------------------------------------------


def spec(model: str, alphabet: str | None = None):
    data = {"input": {"uri": "x.fa"}, "output": {"uri": "out/"}, "model": {"name": model}}
    if alphabet:
        data["input"]["alphabet"] = alphabet
    return parse_spec(data)


def test_alphabet_for_models() -> None:
    assert alphabet_for(spec("esm2_t6_8M_UR50D")) is PROTEIN
    assert alphabet_for(spec("dnabert-s")) is DNA
    assert alphabet_for(spec("some-org/some-model", "dna")) is DNA
    assert alphabet_for(spec("esm2_t6_8M_UR50D", "dna")) is DNA
    with pytest.raises(ConfigError, match=r"set input\.alphabet"):
        alphabet_for(spec("some-org/some-model"))


def test_protein_alphabet_matches_fair_esm() -> None:
    esm_data = pytest.importorskip("esm.data")
    standard = set(esm_data.Alphabet.from_architecture("ESM-1b").standard_toks)
    assert set(PROTEIN.letters) == standard - {".", "-"}
