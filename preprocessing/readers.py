"""Input discovery and streaming readers: every input becomes an ordered stream of :class:`Event`.

An event is one *document read*: either a document with its text, or a record that could not be
read as one (bad JSON, a missing text field, a binary file, the unreadable tail of a truncated
``.gz``/``.zst``), which carries the named reason it is skipped for. The build counts every event
exactly once, so ``documents.read == written + skipped`` holds by construction.

Supported inputs: ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst``
(one JSON object per line), ``.parquet`` (read in row-group batches, e.g. FineWeb-Edu as is),
directories (searched recursively for those suffixes) and globs. Files are read in sorted order, so
the stream, and therefore the output, is the same on every machine.

Invalid UTF-8 is replaced (U+FFFD) and the document kept, counted under ``repaired.invalid_utf8``;
a file whose bytes hold a NUL or mostly undecodable bytes is skipped as ``binary``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
BINARY_SNIFF_BYTES = 8192
MAX_BAD_CHAR_FRACTION = 0.1
PARQUET_BATCH_ROWS = 1024


class InputError(RuntimeError):
    """An input can't be found or read at all; the message names it."""


@dataclass(slots=True)
class Event:
    """One document read: ``text`` is set for a document, ``skip`` names why it is not one.

    ``repaired`` names a repair applied to the text (``invalid_utf8``); ``error`` holds the file
    error text for file-level events (truncation, unreadable file).
    """

    id: str
    source: str
    text: str | None = None
    skip: str | None = None
    repaired: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class InputFile:
    """A file to read, with the name used in document ids (relative to the input it came from)."""

    path: str
    name: str


def _matches(path: str) -> bool:
    return path.endswith(ALL_SUFFIXES)


def expand_inputs(specs: list[str]) -> list[InputFile]:
    """Resolve files, directories and globs to a sorted, de-duplicated list of input files."""
    found: dict[str, InputFile] = {}
    for spec in specs:
        if os.path.isdir(spec):
            root = Path(spec)
            for p in sorted(root.rglob("*")):
                if p.is_file() and _matches(p.name):
                    found.setdefault(str(p), InputFile(str(p), str(p.relative_to(root))))
        elif os.path.isfile(spec):
            found.setdefault(spec, InputFile(spec, os.path.basename(spec)))
        else:
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"--input {spec!r}: no such file, directory or glob match")
            for m in matches:
                found.setdefault(m, InputFile(m, os.path.basename(m)))
    files = [found[k] for k in sorted(found)]
    if not files:
        raise InputError(f"--input {specs}: no input files with suffixes {ALL_SUFFIXES}")
    return files


def read_file_list(path: str) -> list[str]:
    """Lines of a ``--file-list`` file (blank lines and ``#`` comments ignored)."""
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def partition(files: list[InputFile], task: int, count: int) -> list[InputFile]:
    """Contiguous block ``task`` of ``count`` blocks of ``files``, balanced by size on disk.

    Blocks keep input order, so concatenating the blocks of tasks 0..count-1 gives ``files``.
    """
    if not 0 <= task < count:
        raise ValueError(f"task index {task} is outside 0..{count - 1}")
    sizes = [max(os.path.getsize(f.path), 1) for f in files]
    total, acc, out = sum(sizes), 0, []
    for f, size in zip(files, sizes, strict=True):
        # A file belongs to the block its midpoint falls into.
        if min(int((acc + size / 2) * count / total), count - 1) == task:
            out.append(f)
        acc += size
    return out


def decode_text(raw: bytes) -> tuple[str | None, str | None]:
    """(text, repaired) or (None, "binary") for bytes that are not text."""
    if b"\x00" in raw[:BINARY_SNIFF_BYTES] or (b"\x00" in raw):
        return None, "binary"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        if text.count("\ufffd") > MAX_BAD_CHAR_FRACTION * max(len(text), 1):
            return None, "binary"
        return text, "invalid_utf8"


def _read_txt(f: InputFile) -> Iterator[Event]:
    with open(f.path, "rb") as fh:
        raw = fh.read()
    text, flag = decode_text(raw)
    if text is None:
        yield Event(id=f.name, source=f.path, skip=flag)
    else:
        yield Event(id=f.name, source=f.path, text=text, repaired=flag)


class TruncatedInput(Exception):
    """A compressed stream ended before its end marker."""


def _iter_zst_chunks(path: str, chunk: int = 1 << 16) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-frame) .zst file; TruncatedInput if cut short."""
    with open(path, "rb") as fh:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        pending = False
        while block := fh.read(chunk):
            while block:
                out = dobj.decompress(block)
                pending = True
                if out:
                    yield out
                block = b""
                if dobj.eof:
                    pending = False
                    block = dobj.unused_data
                    dobj = zstandard.ZstdDecompressor().decompressobj()
        if pending:
            raise TruncatedInput("zstd stream ended before the end of its frame")


def iter_lines(path: str) -> Iterator[bytes]:
    """Lines of a plain, .gz or .zst file, streamed; TruncatedInput/OSError on a bad stream."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            try:
                yield from fh
            except EOFError as err:
                raise TruncatedInput(str(err)) from err
    elif path.endswith(".zst"):
        rest = b""
        for out in _iter_zst_chunks(path):
            lines = (rest + out).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest
    else:
        with open(path, "rb") as fh:
            yield from fh


def _record_event(
    f: InputFile, lineno: int, line: bytes, text_key: str, id_key: str
) -> Event | None:
    default_id = f"{f.name}:{lineno}"
    if not line.strip():
        return None  # blank lines are not records
    text_line, flag = decode_text(line)
    if text_line is None:
        return Event(id=default_id, source=f.path, skip="binary")
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError:
        return Event(id=default_id, source=f.path, skip="invalid_json")
    return record_to_event(record, default_id, f.path, text_key, id_key, flag)


def record_to_event(
    record: Any, default_id: str, source: str, text_key: str, id_key: str, repaired: str | None
) -> Event:
    """Turn one parsed record (a dict) into an event; a missing or non-string text is skipped."""
    if not isinstance(record, dict):
        return Event(id=default_id, source=source, skip="invalid_json")
    own_id = record.get(id_key)
    doc_id = str(own_id) if own_id is not None else default_id
    text = record.get(text_key)
    if not isinstance(text, str):
        return Event(id=doc_id, source=source, skip="missing_text")
    return Event(id=doc_id, source=source, text=text, repaired=repaired)


def _truncation_event(f: InputFile, lineno: int, err: Exception) -> Event:
    return Event(
        id=f"{f.name}:{lineno}",
        source=f.path,
        skip="truncated_file",
        error=f"{type(err).__name__}: {err}",
    )


def _read_jsonl(f: InputFile, text_key: str, id_key: str) -> Iterator[Event]:
    lineno = 0
    lines = iter_lines(f.path)
    while True:
        try:
            line = next(lines, None)
        except (TruncatedInput, OSError, zlib.error, zstandard.ZstdError) as err:
            if lineno == 0:
                raise InputError(f"{f.path}: unreadable ({type(err).__name__}: {err})") from err
            # The unread rest of the file (at least the record cut in half) is one skipped event.
            yield _truncation_event(f, lineno + 1, err)
            return
        if line is None:
            return
        lineno += 1
        event = _record_event(f, lineno, line, text_key, id_key)
        if event is not None:
            yield event


def _read_parquet(f: InputFile, text_key: str, id_key: str) -> Iterator[Event]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise InputError(f"{f.path}: unreadable parquet ({type(err).__name__}: {err})") from err
    names = pf.schema_arrow.names
    if text_key not in names:
        raise InputError(f"{f.path}: no column {text_key!r} (--text-key); columns are {names}")
    columns = [text_key] + ([id_key] if id_key in names and id_key != text_key else [])
    row = 0
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a corrupt row group after good ones: the rest is lost
            if row == 0:
                raise InputError(
                    f"{f.path}: unreadable parquet ({type(err).__name__}: {err})"
                ) from err
            yield _truncation_event(f, row, err)
            return
        if batch is None:
            return
        texts = batch.column(text_key).to_pylist()
        ids = batch.column(id_key).to_pylist() if id_key in columns else [None] * len(texts)
        for text, own_id in zip(texts, ids, strict=True):
            doc_id = str(own_id) if own_id is not None else f"{f.name}:{row}"
            row += 1
            if isinstance(text, str):
                yield Event(id=doc_id, source=f.path, text=text)
            else:
                yield Event(id=doc_id, source=f.path, skip="missing_text")


def read_file(f: InputFile, text_key: str = "text", id_key: str = "id") -> Iterator[Event]:
    """Stream the events of one input file; :class:`InputError` if it can't be read at all."""
    if not os.access(f.path, os.R_OK):
        raise InputError(f"{f.path}: not readable")
    if f.path.endswith(TEXT_SUFFIXES):
        yield from _read_txt(f)
    elif f.path.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(f, text_key, id_key)
    elif f.path.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(f, text_key, id_key)
    else:
        raise InputError(f"{f.path}: unsupported suffix; expected one of {ALL_SUFFIXES}")


def iter_events(
    files: list[InputFile], text_key: str, id_key: str, skip_bad_files: bool
) -> Iterator[Event]:
    """All events of all files in order; an unreadable file raises unless ``skip_bad_files``."""
    for f in files:
        try:
            yield from read_file(f, text_key, id_key)
        except (InputError, OSError) as err:
            if not skip_bad_files:
                if isinstance(err, InputError):
                    raise
                raise InputError(f"{f.path}: unreadable ({type(err).__name__}: {err})") from err
            yield Event(id=f.name, source=f.path, skip="unreadable_file", error=str(err))


def check_hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Fail at once, with the reason, when the Hugging Face hub can't be used from here."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise InputError(f"--hf-dataset needs the Hugging Face hub, but {var} is set (offline)")
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as err:
        raise InputError(
            f"--hf-dataset needs the Hugging Face hub, but {host}:443 is unreachable ({err}); "
            "this machine looks offline: download the files elsewhere and pass them with --input"
        ) from err


def iter_hf_events(
    dataset: str, name: str | None, split: str, text_key: str, id_key: str
) -> Iterator[Event]:
    """Stream a Hugging Face dataset (``datasets.load_dataset(..., streaming=True)``)."""
    check_hub_reachable()
    try:
        import datasets
    except ImportError as err:
        raise InputError("--hf-dataset needs the `datasets` package: pip install datasets") from err
    stream = datasets.load_dataset(dataset, name=name, split=split, streaming=True)
    source = f"hf://{dataset}" + (f"/{name}" if name else "") + f"/{split}"
    for i, record in enumerate(stream):
        yield record_to_event(record, f"{source}:{i}", source, text_key, id_key, None)
