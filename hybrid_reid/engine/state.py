"""A run's folder on disk: complete-or-absent checkpoints, verified resume, one run per folder.

* :func:`save_checkpoint` writes ``accelerator.save_state`` plus ``checkpoint.json`` (the run's
  progress and every file's size and SHA-256) into ``checkpoints/.tmp-<name>``, and renames it to
  ``checkpoints/<name>`` only when complete. Old checkpoints are renamed away before they are
  deleted. So a ``kill -9`` at any moment leaves only complete checkpoints under their real names.
* :func:`verify_checkpoint` checks a folder against its manifest (a truncated or altered file is
  named) and reads every pickle in it with ``weights_only=True`` (a pickle that would run code is
  refused, and its code does not run). :func:`find_checkpoint` falls back from a bad newest
  checkpoint to the previous complete one, with a warning.
* :class:`RunLock` keeps a second run off an ``OUTPUT_DIR`` in use (``flock``: released by the
  kernel when the process dies, even by ``kill -9``); :func:`check_fresh_output_dir` refuses to
  start a new run over an earlier one without ``--resume``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from typing import Dict, List, Optional, Tuple

from ..models.checkpoint import CheckpointError
from ..utils import write_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "epoch_"
MANIFEST = "checkpoint.json"
LOCK_NAME = ".lock"
_TMP, _DEL = ".tmp-", ".del-"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names
                  if n != MANIFEST)


def list_checkpoints(ckpt_dir: str) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of the epoch checkpoints under ``ckpt_dir`` (by name; not verified), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            found.append((int(name[len(CHECKPOINT_PREFIX):]), os.path.join(ckpt_dir, name)))
    return sorted(found)


def remove_leftovers(ckpt_dir: str) -> None:
    """Delete the temporary folders a killed run left behind (never complete checkpoints)."""
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith((_TMP, _DEL)):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, name: str, progress: Dict[str, object], keep: int = 0) -> str:
    """``save_state`` + manifest into ``checkpoints/.tmp-<name>``, renamed to ``checkpoints/<name>``
    once complete; then only the newest ``keep`` epoch checkpoints are kept (0 = keep all)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, _TMP + name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f: {"size": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
                 for f in _files(tmp)}
        manifest = {"format": 1, "progress": progress, "files": files, "saved_at": time.time()}
        write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        if os.path.exists(final):  # re-saving an epoch (after a fallback): move the old one away first
            os.replace(final, os.path.join(ckpt_dir, _DEL + name))
        os.replace(tmp, final)
        if keep:
            for _, old in list_checkpoints(ckpt_dir)[:-keep]:
                away = os.path.join(ckpt_dir, _DEL + os.path.basename(old))
                os.replace(old, away)  # a kill during the delete leaves no half checkpoint under a real name
        remove_leftovers(ckpt_dir)
    accelerator.wait_for_everyone()
    return final


def _weights_only_load(path: str) -> None:
    """Read one pickle the way resume will (accelerate's loader: ``weights_only=True`` plus numpy
    arrays for the RNG states); raise :class:`CheckpointError` naming it if it is not weights-only."""
    from accelerate.utils import load

    try:
        load(path, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is a pickle that is not weights-only (loading it "
                              f"could run arbitrary code); nothing in it was executed. Detail: "
                              f"{str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None


def verify_checkpoint(path: str) -> Dict[str, object]:
    """The manifest of the complete checkpoint folder ``path``.

    Raises:
        CheckpointError: not a folder, no manifest, a file missing / of the wrong size / with the
            wrong hash (the message names it), or a pickle that is not weights-only.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder (expected OUTPUT_DIR/checkpoints/"
                              f"{CHECKPOINT_PREFIX}NNN)")
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        manifest["progress"]["epoch"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST}; it is incomplete or was not written by run.py train") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: corrupted ({e})") from None
    for name, meta in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = os.path.getsize(f)
        if size != meta["size"]:
            raise CheckpointError(f"{f}: truncated or altered ({size} bytes, the manifest says {meta['size']})")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: corrupted (its SHA-256 differs from the manifest's)")
    extra = [n for n in _files(path) if n not in files]
    if extra:
        raise CheckpointError(f"{path}: files not in the manifest: {extra}")
    for name in files:
        if name.endswith((".bin", ".pkl", ".pt", ".pth")):
            _weights_only_load(os.path.join(path, name))
    return manifest


def find_checkpoint(output_dir: str, resume: str) -> Tuple[str, Dict[str, object]]:
    """``(path, manifest)`` of the checkpoint to resume from.

    ``resume="latest"``: the newest checkpoint under ``OUTPUT_DIR/checkpoints`` that verifies; a
    bad one is reported by name and the previous one is tried. Any other value is a checkpoint
    folder, which must verify.
    """
    if resume != "latest":
        return resume, verify_checkpoint(resume)
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir} to resume from (start without --resume, "
                                "or pass --resume PATH)")
    for i, (_, path) in enumerate(reversed(candidates)):
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as e:
            older = candidates[-2 - i][1] if i + 1 < len(candidates) else None
            logger.warning("skipping checkpoint %s: %s%s", path, e,
                           f"; falling back to {older}" if older else "; no older checkpoint left")
            continue
        return path, manifest
    raise CheckpointError(f"--resume: none of the {len(candidates)} checkpoint(s) in {ckpt_dir} is complete and "
                          "intact (see the warnings above); start again without --resume in a new output_dir")


class RunLock:
    """An exclusive lock on ``OUTPUT_DIR/.lock`` for the life of a run (main process only).

    ``flock`` locks die with their process, so a run killed with ``kill -9`` never leaves a stale
    lock behind. A second run on the same folder gets :class:`RunLockedError`.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run ({holder or 'unknown'});"
                                     " wait for it to finish, or use another output_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunLockedError(RuntimeError):
    """Another run holds ``OUTPUT_DIR``."""


class OutputDirNotEmptyError(RuntimeError):
    """A new run would overwrite an earlier one."""


def check_fresh_output_dir(output_dir: str) -> None:
    """Refuse to start a new run in a folder that holds anything but the lock file."""
    if not os.path.isdir(output_dir):
        return
    entries = sorted(n for n in os.listdir(output_dir) if n != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise OutputDirNotEmptyError(
            f"output_dir {output_dir} already holds a run ({shown}); pass --resume to continue it, set another "
            f"output_dir (e.g. output_dir={output_dir.rstrip('/')}_2), or delete the folder to start over")
