"""Run the CLI under a faster memory allocator (tcmalloc or jemalloc) when one is installed.

A per-sample step allocates and frees a handful of small tensors (the compiled chunk's loop
carries new parameter and state buffers every step; the eager step creates its gradients).
glibc's malloc spends microseconds per step on that (consolidating free lists before every
allocation of a few KB); tcmalloc and jemalloc serve the same requests from per-thread caches.
Measured on the 2-core CPU for per-sample softmax regression: compiled 9.5 -> 6.7 us/step with
tcmalloc (docs/performance.md). An allocator must be loaded before the process starts, so the CLI
re-executes itself once with ``LD_PRELOAD`` set, before torch is imported (~30 ms).

``SINGLESTEP_MALLOC`` chooses: ``auto`` (default: the first of :data:`CANDIDATES` found, else the
system's), ``system`` (never re-execute), or a path to an allocator library. Linux only; anywhere
else the system allocator is used.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from singlestep.errors import UserError

__all__ = ["CANDIDATES", "find", "kind", "preload_env", "in_use", "reexec"]

# Debian/Ubuntu packages: libtcmalloc-minimal4, libjemalloc2, libgoogle-perftools4.
CANDIDATES = ("libtcmalloc_minimal.so.4", "libjemalloc.so.2", "libtcmalloc.so.4")
_MARK = "SINGLESTEP_MALLOC_PRELOADED"


def _search_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    machine = os.uname().machine if hasattr(os, "uname") else ""
    dirs += [Path(f"/usr/lib/{machine}-linux-gnu"), Path(f"/lib/{machine}-linux-gnu"), Path("/usr/lib64"),
             Path("/usr/lib"), Path("/usr/local/lib")]  # fmt: skip
    return dirs


def find(choice: str | None = None) -> str | None:
    """The allocator library ``SINGLESTEP_MALLOC`` (or ``choice``) asks for; None: the system's.

    Raises:
        UserError: the setting names a file that does not exist.
    """
    choice = (choice if choice is not None else os.environ.get("SINGLESTEP_MALLOC", "auto")).strip() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            raise UserError(f"SINGLESTEP_MALLOC={choice}: no such file (use auto, system, or a path to an allocator library)")
        if not _same_machine(Path(choice)):
            raise UserError(f"SINGLESTEP_MALLOC={choice}: not a shared library for this machine's architecture")
        return str(Path(choice).resolve())
    for name in CANDIDATES:
        for d in _search_dirs():
            if (d / name).is_file() and _same_machine(d / name):
                return str(d / name)
    return None


def _elf_kind(path: Path | str) -> bytes | None:
    """ELF class, byte order and machine of a file (what the loader checks), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    return head[4:6] + head[18:20] if len(head) == 20 and head[:4] == b"\x7fELF" else None


def _same_machine(lib: Path) -> bool:
    """Whether ``lib`` is an ELF object the loader would preload into this Python.

    A library built for another architecture would only make the loader print an error for
    this process and every child it starts (the compiler included), so it is never chosen.
    """
    elf = _elf_kind(lib)
    return elf is not None and elf == _python_elf_kind()


@functools.cache
def _python_elf_kind() -> bytes | None:
    return _elf_kind(sys.executable)


def kind(lib: str | None) -> str:
    """``tcmalloc``, ``jemalloc`` or ``system`` for a library path from :func:`find` (None: system)."""
    if lib is None:
        return "system"
    return "jemalloc" if "jemalloc" in Path(lib).name else "tcmalloc"


def preload_env(env: dict[str, str] | None = None, choice: str | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the chosen allocator added to ``LD_PRELOAD``."""
    env = dict(os.environ if env is None else env)
    lib = find(choice)
    if lib is None or lib in env.get("LD_PRELOAD", "").split(":"):
        return env
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    # gperftools reports every allocation over 1 GiB on stderr; a big dataset is not news.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def in_use() -> str:
    """The allocator this process runs with: ``tcmalloc``, ``jemalloc`` or ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def reexec() -> None:
    """Re-execute this command line under the chosen allocator, once; returns if none applies.

    Call it first thing in a ``__main__`` block, before torch is imported.
    """
    if os.environ.get(_MARK) or not hasattr(os, "execve"):
        return
    env = preload_env()
    if env.get("LD_PRELOAD", "") == os.environ.get("LD_PRELOAD", ""):
        return  # nothing to add: the system allocator, or already preloaded
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
