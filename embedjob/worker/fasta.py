"""Streaming FASTA reader and writer.

The reader holds one record at a time and reads lines in bounded pieces, so neither a
10^7-record file nor a multi-gigabyte single-line "sequence" grows memory past one record
(and a record past :data:`MAX_SEQUENCE_LENGTH` stops the read). Every problem is an
:class:`InputError` with one line naming the file, the record, the line and the fix.

Accepted: plain or gzip input (detected by its magic bytes, not its name; multi-member and
bgzip files too), ``\\n`` or ``\\r\\n`` line endings, blank lines, wrapped or single-line
sequences, lower case (upper-cased), spaces inside sequence lines (dropped, as Biopython
does). The id is the header's first whitespace-separated word; the rest is ignored.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from embedjob.alphabets import Alphabet
from embedjob.failures import InputError

MAX_SEQUENCE_LENGTH = 1_000_000
"""Longer than any protein (titin: ~35k) and than any sensible model input even with
windows; a longer 'sequence' is a genome or a broken file, refused before it fills memory."""

MAX_ID_LENGTH = 1000
_PIECE = 1 << 16  # bytes per readline() call: bounds memory on endless lines
_WHITESPACE = b" \t\r\n\v\f"
_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}


class Record(NamedTuple):
    id: str
    seq: str


def read_fasta(
    stream: BinaryIO, source: str, alphabet: Alphabet | frozenset[str]
) -> Iterator[Record]:
    """Yield the records of a FASTA stream (plain or gzip), validated against ``alphabet``."""
    alpha = alphabet if isinstance(alphabet, Alphabet) else Alphabet("custom", alphabet)
    parser = _Parser(source, alpha)
    for line_no, piece, starts_line in _pieces(_decompressed(stream, source), source):
        record = parser.feed(line_no, piece, starts_line)
        if record is not None:
            yield record
    last = parser.finish()
    if last is not None:
        yield last


def write_fasta(
    records: Iterable[Record | tuple[str, str]], stream: BinaryIO, width: int = 0
) -> int:
    """Write records (one sequence line each, or wrapped at ``width``); returns the count."""
    count = 0
    for rec_id, seq in records:
        data = seq.encode("ascii")
        if width > 0:
            data = b"\n".join(data[i : i + width] for i in range(0, len(data), width))
        stream.write(b">" + rec_id.encode("utf-8") + b"\n" + data + b"\n")
        count += 1
    return count


# --- bytes in --------------------------------------------------------------------------------


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: sniffing without needing seek()."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    head = b""
    while len(head) < n:
        chunk = stream.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _decompressed(stream: BinaryIO, source: str) -> BinaryIO:
    head = _read_exactly(stream, 6)
    raw = io.BufferedReader(_Prepended(head, stream), buffer_size=1 << 20)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    for magic, name in _OTHER_COMPRESSION.items():
        if head.startswith(magic):
            raise InputError(
                f"{source} is {name}-compressed: only plain or gzip FASTA is read — "
                f"decompress it or recompress it with gzip"
            )
    return raw  # type: ignore[return-value]


def _pieces(stream: BinaryIO, source: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, piece without its newline, whether the piece starts a line)."""
    line_no = 0
    starts_line = True
    while True:
        try:
            piece = stream.readline(_PIECE)
        except (OSError, EOFError, zlib.error) as err:
            raise _gzip_error(source, line_no, err) from None
        if not piece:
            return
        if starts_line:
            line_no += 1
        if b"\0" in piece:
            raise InputError(
                f"{source} line {line_no}: binary content (NUL bytes) — give a FASTA text file"
            )
        complete = piece.endswith(b"\n")
        yield line_no, piece.rstrip(b"\n") if complete else piece, starts_line
        starts_line = complete


def _gzip_error(source: str, line_no: int, err: BaseException) -> InputError:
    if isinstance(err, gzip.BadGzipFile | EOFError | zlib.error):
        return InputError(
            f"{source}: corrupt or truncated gzip data after line {line_no} ({err}) — "
            "re-create or re-download the file"
        )
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return InputError(f"{source}: read failed after line {line_no}: {reason}")


# --- records ---------------------------------------------------------------------------------


class _Parser:
    """Turns line pieces into records; keeps only the record being read."""

    def __init__(self, source: str, alphabet: Alphabet) -> None:
        self.source = source
        self.alphabet = alphabet
        self.allowed = "".join(sorted(alphabet.letters)).encode("ascii")
        self.id: str | None = None
        self.header_line = 0
        self.in_header = False
        self.parts: list[bytes] = []
        self.length = 0
        self.stop_at: tuple[int, int] | None = None  # (line, position) of a trailing '*'
        self.seen_content = False

    def feed(self, line_no: int, piece: bytes, starts_line: bool) -> Record | None:
        if not starts_line and self.in_header:
            return None  # the rest of a long header: only its first word matters
        if starts_line and piece.startswith(b">"):
            done = self._close()
            self._start(line_no, piece)
            return done
        self.in_header = False
        residues = piece.translate(None, _WHITESPACE)
        if not residues:
            return None
        if self.id is None:
            raise self._not_fasta(line_no, piece)
        self._add(line_no, residues.upper())
        return None

    def finish(self) -> Record | None:
        """End of input: the last record, or an error if there was no record at all."""
        if self.id is None and not self.seen_content:
            raise InputError(f"{self.source} is empty: no FASTA records — check input.uri")
        return self._close()

    def _close(self) -> Record | None:
        if self.id is None:
            return None
        if self.length == 0:
            raise InputError(
                f"{self.source} line {self.header_line}: sequence {self.id!r} is empty — "
                "remove the record or add its sequence"
            )
        record = Record(self.id, b"".join(self.parts).decode("ascii"))
        self.id, self.parts, self.length, self.stop_at = None, [], 0, None
        return record

    def _start(self, line_no: int, piece: bytes) -> None:
        self.seen_content = True
        self.in_header = True
        self.header_line = line_no
        words = piece[1:].split(maxsplit=1)
        if not words:
            raise InputError(
                f"{self.source} line {line_no}: a header has an empty id — put an id right "
                "after '>'"
            )
        raw_id = words[0]
        if len(raw_id) > MAX_ID_LENGTH:
            raise InputError(
                f"{self.source} line {line_no}: id longer than {MAX_ID_LENGTH} characters — "
                "shorten the ids"
            )
        try:
            self.id = raw_id.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(
                f"{self.source} line {line_no}: header is not valid UTF-8 (binary or "
                "mis-encoded file?) — give a UTF-8 FASTA text file"
            ) from None

    def _not_fasta(self, line_no: int, piece: bytes) -> InputError:
        start = piece[:20].decode("utf-8", "replace")
        hint = " (FASTQ? convert it with 'seqtk seq -a')" if piece.startswith(b"@") else ""
        return InputError(
            f"{self.source} is not FASTA: line {line_no} starts with {start!r}, expected a "
            f"'>' header{hint} — give a FASTA file"
        )

    def _add(self, line_no: int, residues: bytes) -> None:
        if self.stop_at is not None:
            raise self._bad_residue(*self.stop_at, "*", internal_stop=True)
        bad = residues.translate(None, self.allowed)
        if bad:
            residues = self._check_bad(line_no, residues, bad)
        if self.length + len(residues) > MAX_SEQUENCE_LENGTH:
            raise InputError(
                f"{self.source} line {self.header_line}: sequence {self.id!r} is longer than "
                f"{MAX_SEQUENCE_LENGTH:,} residues — split it or leave it out"
            )
        self.parts.append(residues)
        self.length += len(residues)

    def _check_bad(self, line_no: int, residues: bytes, bad: bytes) -> bytes:
        """A single trailing '*' is a stop codon (stripped if the alphabet allows it);
        anything else outside the alphabet is an error at its exact position."""
        if self.alphabet.strip_stop and bad == b"*" and residues.endswith(b"*"):
            self.stop_at = (line_no, self.length + len(residues))
            return residues[:-1]
        allowed = set(self.allowed)
        index = next(i for i, b in enumerate(residues) if b not in allowed)
        char = residues[index : index + 1]
        raise self._bad_residue(line_no, self.length + index + 1, char.decode("latin-1"))

    def _bad_residue(
        self, line_no: int, position: int, char: str, internal_stop: bool = False
    ) -> InputError:
        if internal_stop:
            return InputError(
                f"{self.source} line {line_no}: stop '*' inside sequence {self.id!r} at position "
                f"{position} (only one trailing '*' is allowed) — fix the translation or "
                "remove the sequence"
            )
        shown = repr(char) if char.isprintable() and ord(char) < 128 else f"byte 0x{ord(char):02X}"
        return InputError(
            f"{self.source} line {line_no}: invalid residue {shown} at position {position} of "
            f"sequence {self.id!r}, not in the {self.alphabet.name} alphabet "
            f"({self.alphabet.display}) — {self.alphabet.hint or 'fix or remove the sequence'}"
        )
