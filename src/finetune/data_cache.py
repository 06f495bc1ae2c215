"""Tokenized data kept on disk, so that a second run on the same data skips tokenizing.

An entry is stored under a key, a SHA-256 of files and settings: data.py hashes everything that
decides the token ids into it (see `data.tokenized`). Entries live in `$FINETUNE_CACHE` (default
`$XDG_CACHE_HOME/finetune/tokenized`, i.e. `~/.cache/finetune/tokenized`), one file per key,
`<key>.tokens`; nothing removes old ones (delete the directory to reclaim the space).

An entry is written to a temporary name and renamed into place, so a reader never sees half of
one; on reading, its header, length and payload checksum are checked, and an entry that fails
any check is never used: the data is tokenized again and the entry rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from array import array
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# The first bytes of every entry; a new layout changes it, and old entries then miss.
MAGIC = b"finetune-tokens-1\n"
# Token ids and labels (-100) are stored as signed 32-bit integers.
ITEM = "i"
# One tokenized example: its token ids and their labels.
Sequence = tuple[list[int], list[int]]


def cache_dir() -> Path:
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune" / "tokenized"


def cache_key(files: list[Path], settings: dict[str, object]) -> str:
    """A SHA-256 of the bytes of `files` and of `settings` (JSON-serializable)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        key.update(file_digest(path))
    return key.hexdigest()


def cached_sequences(
    key: str, tokenize: Callable[[], list[Sequence]], source: Path
) -> list[Sequence]:
    """The sequences stored under `key`, or `tokenize()`d and stored when there are none.
    `source` names the data in the log line."""
    entry = cache_dir() / f"{key}.tokens"
    sequences = read_entry(entry)
    if sequences is not None:
        log.info("%s: %d tokenized examples read from %s", source, len(sequences), entry)
        return sequences
    sequences = tokenize()
    try:
        write_entry(entry, sequences)
    except OSError as error:  # a full or read-only disk costs the next run time, nothing else
        log.warning("tokenized data not cached: %s: %s", error.filename or entry, error.strerror)
    return sequences


def file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


# An entry: MAGIC, a JSON header line {"lengths": [...], "sha256": ...}, then the payload: every
# example's tokens followed by its labels, as ITEM integers in this machine's byte order.


def write_entry(entry: Path, sequences: list[Sequence]) -> None:
    payload = array(ITEM)
    for tokens, labels in sequences:
        payload.extend(tokens)
        payload.extend(labels)
    data = payload.tobytes()
    header = {
        "byteorder": sys.byteorder,
        "lengths": [len(tokens) for tokens, _ in sequences],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the entry and renamed: a run that dies mid-write leaves a temporary file
    # that no key names, and two runs writing the same entry each replace it whole.
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + json.dumps(header).encode() + b"\n" + data)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(entry: Path) -> list[Sequence] | None:
    """The sequences an entry holds, or None when there is none or it is damaged."""
    try:
        raw = entry.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("%s: unreadable tokenized-data cache entry (%s): tokenizing", entry, error)
        return None
    sequences = decode_entry(raw)
    if sequences is None:
        log.warning("%s: damaged tokenized-data cache entry: tokenizing again", entry)
    return sequences


def decode_entry(raw: bytes) -> list[Sequence] | None:
    if not raw.startswith(MAGIC):
        return None
    header_line, newline, data = raw[len(MAGIC) :].partition(b"\n")
    try:
        header = json.loads(header_line)
        lengths = [int(n) for n in header["lengths"]]
        valid = (
            newline == b"\n"
            and header["byteorder"] == sys.byteorder
            and header["sha256"] == hashlib.sha256(data).hexdigest()
        )
    except (ValueError, KeyError, TypeError):
        return None
    payload = array(ITEM)
    if not valid or len(data) != 2 * sum(lengths) * payload.itemsize:
        return None
    payload.frombytes(data)
    sequences, start = [], 0
    for n in lengths:
        sequences.append(
            (payload[start : start + n].tolist(), payload[start + n : start + 2 * n].tolist())
        )
        start += 2 * n
    return sequences
