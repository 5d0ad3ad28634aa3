"""Paths that a client names (a model, a preset, a LoRA, an output) stay inside their folders.

A client on the wire may send ``../../etc/passwd``, an absolute path, a URL-encoded ``%2e%2e/``,
a Windows ``..\\``, or a name that a symlink inside the folder points out of. :func:`confine`
resolves the name the way the file system will (symlinks followed) and refuses anything that
does not land inside one of the allowed roots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from sdbridge.errors import SdbridgeError, quoted


class PathError(SdbridgeError):
    code = "forbidden_path"


def confine(name: str, roots: Iterable[str | Path], what: str = "path") -> Path:
    """The resolved path of ``name`` inside one of ``roots``, or PathError naming what was refused."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PathError(f"{what} {quoted(name)} is not a usable name")
    decoded = name
    for _ in range(3):  # %252e%252e -> %2e%2e -> ..
        decoded = unquote(decoded)
    if decoded != name:
        raise PathError(f"{what} {quoted(name)} is URL-encoded; send the plain name")
    candidate = name.replace("\\", "/")
    if candidate.startswith("~"):
        raise PathError(f"{what} {quoted(name)} names a home folder; send a name inside the allowed folders")
    given_roots = [Path(os.path.abspath(Path(root).expanduser())) for root in roots]
    resolved_roots = [root.resolve() for root in given_roots]
    if not resolved_roots:
        raise PathError(f"{what} {quoted(name)} refused: no folder is open to clients")
    absolute = os.path.isabs(candidate)
    if absolute and not any(_lexically_inside(Path(os.path.normpath(candidate)), root)
                            for root in (*given_roots, *resolved_roots)):
        # Judged by its text, before the file system is touched: on Windows, resolving \\host\share\x opens an
        # SMB session to that host, offering the user's credentials, and \\.\pipe\x a local pipe (QA 44 F3).
        raise PathError(f"{what} {quoted(name)} is outside the folders clients may use ({_shown(resolved_roots)})")
    for root in resolved_roots:
        target = Path(candidate) if absolute else root / candidate
        real = target.resolve()
        if _lexically_inside(real, root):
            return real
    raise PathError(f"{what} {quoted(name)} is outside the folders clients may use ({_shown(resolved_roots)})")


def _lexically_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _shown(roots: list[Path]) -> str:
    return ", ".join(str(root) for root in roots)
