"""``text``: a character- (or byte-) level language-modelling corpus from plain files.

The vocabulary is every distinct character (or byte) of the whole corpus, sorted; a token id is the
position in that list. The token stream is split contiguously: the last ``val_fraction`` of it is
the validation split, so no validation window overlaps a training window. Every start offset of a
``block_size`` window is a training sample, with the same window shifted by one as its targets;
validation windows are laid end to end (stride ``block_size``), so evaluation scores each held-out
token once.

``meta.extras`` carries the vocabulary (``vocab``, ``level``, ``vocab_size``, ``block_size``); the
trainer saves it with the run as ``vocab.json`` and :func:`encode` / :func:`decode` turn text into
ids and back with it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from singlestep.data.base import DataBundle, DataMeta, TokenSplit
from singlestep.errors import DataError
from singlestep.registry import DATASETS

__all__ = ["LEVELS", "build_text", "decode", "encode", "expand_paths", "text_bundle", "tokenize"]

LEVELS = ("char", "byte")


def expand_paths(path: str | list[str]) -> list[Path]:
    """Files named by ``path``: one name or glob, or a list of them; globs expand sorted.

    Raises:
        DataError: a name that is not a file, or a glob that matches no file.
    """
    patterns = [path] if isinstance(path, str) else list(path)
    if not patterns:
        raise DataError("text dataset: data.path is an empty list; give a file, a glob or a list of them")
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        # A relative path starts where the run was started, which is easy to forget: say where that is.
        where = "" if os.path.isabs(pattern) else f" (relative to the working directory {os.getcwd()})"
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"text dataset: data.path glob '{pattern}' matches no files{where}")
            files.extend(Path(m) for m in matches)
        elif os.path.isdir(pattern):
            raise DataError(f"text dataset: data.path {pattern} is a folder; give its files, e.g. '{pattern}/*.txt'")
        elif not os.path.isfile(pattern):
            raise DataError(f"text dataset: data.path {pattern}: no such file{where}")
        else:
            files.append(Path(pattern))
    return files


def _read_corpus(files: list[Path], level: str) -> np.ndarray:
    """The concatenated corpus as code points (char level, uint32) or bytes (byte level, uint8)."""
    parts: list[bytes] = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None
        if level == "char":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data.count(b"\n", 0, exc.start) + 1
                raise DataError(
                    f"{file}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) "
                    "is not valid UTF-8; convert the file (e.g. `iconv -f latin1 -t utf-8`), or set "
                    "data.level: byte to read any bytes, one token per byte"
                ) from None
        if not data:
            continue  # an empty file adds nothing, not even a line break
        if parts and not parts[-1].endswith(b"\n"):
            parts.append(b"\n")  # files meet on a line boundary
        parts.append(data)
    if not parts:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"text dataset: the corpus is empty: {names} hold{'s' if len(files) == 1 else ''} no bytes")
    data = b"".join(parts)
    if level == "byte":
        return np.frombuffer(data, dtype=np.uint8)
    # UTF-32 gives one fixed-width code point per character: tokenising is then array work, not a
    # Python loop over millions of characters.
    return np.frombuffer(data.decode("utf-8").encode("utf-32-le"), dtype="<u4")


def tokenize(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of ``codes`` and each element's index into them (compact dtype)."""
    counts = np.bincount(codes)
    vocab = np.flatnonzero(counts)
    lut = np.zeros(counts.shape[0], dtype=np.int32)
    lut[vocab] = np.arange(vocab.shape[0], dtype=np.int32)
    ids = lut[codes]
    if vocab.shape[0] <= 256:
        dtype = np.uint8
    elif vocab.shape[0] <= 2**15:
        dtype = np.int16
    else:
        dtype = np.int32
    return vocab, ids.astype(dtype)


def text_bundle(
    device: torch.device,
    codes: np.ndarray,
    *,
    level: str,
    block_size: int,
    val_fraction: float,
    source: str,
) -> DataBundle:
    """Turn a corpus (code points or bytes, see :func:`_read_corpus`) into windowed LM splits on ``device``."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if codes.size == 0:
        raise DataError(f"text dataset: the corpus {source} is empty")
    vocab_codes, ids = tokenize(codes)
    n = ids.shape[0]
    n_val = round(n * val_fraction)
    n_train = n - n_val
    unit = "characters" if level == "char" else "bytes"
    if n_train <= block_size:
        # A window is block_size inputs plus one more token: the target of the last input.
        held = f" and val_fraction {val_fraction} holds out {n_val}, leaving {n_train} for training" if n_val else ""
        fix = "a longer corpus or a smaller data.block_size" + (
            " (or a smaller data.val_fraction)" if n > block_size else ""
        )
        raise DataError(
            f"{source}: the corpus has {n} {unit}{held}, but a training window needs block_size + 1 = "
            f"{block_size + 1} ({block_size} inputs and the next one as target); use {fix}"
        )
    if 0 < n_val <= block_size:
        raise ValueError(
            f"{source}: val_fraction {val_fraction} of {n} {unit} leaves {n_val} validation tokens, fewer than "
            f"block_size + 1 = {block_size + 1}; raise val_fraction, lower block_size, or set val_fraction: 0"
        )

    def split(part: np.ndarray, stride: int) -> TokenSplit:
        return TokenSplit(torch.from_numpy(np.ascontiguousarray(part)).to(device), block_size, stride=stride)

    # Training samples start at every offset; validation windows do not overlap, so evaluating
    # scores each held-out token once instead of block_size times.
    train = split(ids[:n_train], 1)
    val = split(ids[n_train:], block_size) if n_val else None
    if level == "char":
        vocab: list[Any] = [chr(int(c)) for c in vocab_codes]
    else:
        vocab = [int(c) for c in vocab_codes]
    extras = {"vocab": vocab, "level": level, "vocab_size": len(vocab), "block_size": block_size, "source": source}
    meta = DataMeta(task="lm", input_shape=(block_size,), vocab_size=len(vocab), block_size=block_size, extras=extras)
    return DataBundle(train=train, val=val, test=None, meta=meta)


@DATASETS.register("text", description="character- or byte-level language modelling on your own UTF-8 files")
def build_text(
    device: torch.device,
    *,
    path: str | list[str],
    block_size: int = 128,
    val_fraction: float = 0.1,
    level: str = "char",
) -> DataBundle:
    """A language-modelling corpus from one or more files.

    Args:
        device: where the token streams are put, once.
        path: a file, a glob (``corpus/*.txt``, ``**`` recurses) or a list of them; files are read
            in the order given, globs sorted, and joined on line boundaries.
        block_size: tokens per sample window (the model's context length).
        val_fraction: the last fraction of the token stream, held out for validation (0: none).
        level: ``char`` (files must be UTF-8; one token per character) or ``byte`` (any bytes).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got '{level}'")
    files = expand_paths(path)
    codes = _read_corpus(files, level)
    source = str(files[0]) if len(files) == 1 else f"{len(files)} files from {files[0]}"
    return text_bundle(device, codes, level=level, block_size=block_size, val_fraction=val_fraction, source=source)


def encode(text: str, extras: dict[str, Any]) -> list[int]:
    """Token ids of ``text`` under a run's vocabulary (``meta.extras`` / ``vocab.json``).

    Raises:
        ValueError: ``text`` holds characters (or bytes) the vocabulary lacks; the message lists them.
    """
    level = extras.get("level", "char")
    index = {tok: i for i, tok in enumerate(extras["vocab"])}
    units: Iterable[Any] = text if level == "char" else text.encode("utf-8")
    ids, unknown = [], []
    for unit in units:
        i = index.get(unit)
        if i is None:
            unknown.append(unit)
        else:
            ids.append(i)
    if unknown:
        shown = ", ".join(repr(u if level == "char" else bytes([u])) for u in dict.fromkeys(unknown))
        raise ValueError(f"not in the vocabulary of this run: {shown}")
    return ids


def decode(ids: Iterable[int], extras: dict[str, Any]) -> str:
    """Text of token ids under a run's vocabulary; byte level replaces invalid UTF-8 with U+FFFD."""
    vocab = extras["vocab"]
    if extras.get("level", "char") == "char":
        return "".join(vocab[int(i)] for i in ids)
    return bytes(vocab[int(i)] for i in ids).decode("utf-8", errors="replace")
