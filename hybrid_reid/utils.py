"""Small shared helpers: atomic file writes, optional packages."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Iterator, Optional


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it.

    Readers never see a half-written file, and an interrupted write leaves the old file in place.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result gets a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class MissingPackageError(RuntimeError):
    """An optional package a feature needs is not installed; the message names it and the install command."""


def require_packages(feature: str, packages: Dict[str, str], extra: Optional[str] = None) -> None:
    """Raise :class:`MissingPackageError` unless every module of ``packages`` (``{module: pip name}``)
    is importable; ``feature`` says what needs them, ``extra`` the project's pip extra that has them."""
    import importlib.util

    missing = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
    if missing:
        how = f"pip install 'hybrid_reid[{extra}]' (or pip install {' '.join(missing)})" if extra else \
            f"pip install {' '.join(missing)}"
        raise MissingPackageError(f"{feature} needs {' and '.join(missing)}, which is not installed: {how}")
