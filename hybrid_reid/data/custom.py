"""Your own data without code: the ``folder`` and ``manifest`` data sets.

``folder`` (``data.name: folder``, ``data.root`` = ROOT) reads images sorted into folders::

    ROOT/{train,query,gallery}/<modality>/<pid>/<file>
    ROOT/cameras.csv                  # optional: file,camera (file = path relative to ROOT)

``manifest`` (``data.name: manifest``) reads one CSV or JSON-lines file with one row per sample::

    split,pid,camera,rgb,nir
    train,1,3,images/rgb/0001_a.jpg,images/nir/0001_a.jpg

Rules shared by both:

* A modality folder (``folder``) or column (``manifest``) is named by a modality or one of its
  aliases (``rgb``/``RGB``/``vis``, ``nir``/``NI``, ``tir``/``TI``/``th`` ...), resolved by
  :mod:`hybrid_reid.modalities`; a new one is declared in the config's ``modalities:`` section.
  ``data.modalities`` picks and orders the ones used.
* Cameras are labels (``3``, ``c003``'s ``003``, ``door``), numbered 0..C-1 in sorted order over
  all splits: numerically when every label is an integer (``1``..``6`` -> 0..5), else as text.
* Query and gallery keep their pids (the same pid is the same identity); training pids are
  relabelled 0..N-1. Evaluation is the ``market`` protocol: gallery items of the query's identity
  and camera are removed.
* Everything is checked before training starts, and every problem is reported at once in one
  :class:`DataError` (the manifest's with their line numbers).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from .. import modalities
from ..modalities import is_text
from .datasets import (
    DATASETS,
    DEFAULT_CAMERA_PATTERN,
    IMAGE_EXTENSIONS,
    DataError,
    Problems,
    ReIDData,
    Sample,
    check_readable,
    list_images,
    number_labels,
    relabel,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")


def compile_camera_pattern(pattern: str) -> "re.Pattern":
    """``data.camera_pattern`` compiled; it must have a named group ``camera``."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise DataError(f"data.camera_pattern={pattern!r} is not a regular expression: {e}") from None
    if "camera" not in compiled.groupindex:
        raise DataError(f"data.camera_pattern={pattern!r} has no named group 'camera'; write it as e.g. "
                        f"{DEFAULT_CAMERA_PATTERN!r} (the default)")
    return compiled


def declare_hint(name: str) -> str:
    """How to make ``name`` a modality: the config's ``modalities:`` section."""
    return (f"declare it in the config's modalities: section (e.g. 'modalities: {{{name}: {{channels: 3}}}}', "
            f"channels 1 for one-channel images); known modalities: {', '.join(modalities.names())} (and their "
            "aliases: vis, ni, ti, th, sk, cp ...)")


def csv_rows(reader, width: int, problems: Problems) -> Iterator[Tuple[int, List[str]]]:
    """``(line number, values)`` of a CSV reader's rows after its header: blank lines skipped, a row
    without ``width`` values reported to ``problems`` (with its line) and left out."""
    for row in reader:
        n = reader.line_num
        if not any(v.strip() for v in row):
            continue
        if len(row) != width:
            problems.add(f"{len(row)} values for the header's {width} columns", n)
            continue
        yield n, row


@DATASETS.register("folder")
class FolderSet:
    """Images in folders: ``ROOT/{train,query,gallery}/<modality>/<pid>/<file>`` (``data.root`` = ROOT).

    * **Modalities**: every folder under a split is a modality, named by a modality or an alias (or
      mapped explicitly with ``data.modality_dirs: {modality: folder}``); an unknown name is an error
      saying how to declare it. One modality folder is enough (``data.modalities=[rgb]``).
    * **Pairing**: the images of one sample in several modalities share ``<pid>/<file stem>``
      (``train/rgb/0007/a.jpg`` pairs with ``train/nir/0007/a.png``). A file without its partner in
      every modality of ``data.modalities`` is an error; all of them are listed.
    * **Identities**: the ``<pid>`` folder names; integers are used as they are, any other names
      are numbered in sorted order over all splits.
    * **Cameras**: ``ROOT/cameras.csv`` (header ``file,camera``; ``file`` is a path relative to
      ROOT, e.g. ``train/rgb/0007/a.jpg``; listing one modality's file of a sample is enough) for the
      files it lists, else the named group ``camera`` of ``data.camera_pattern`` searched in the file
      stem (default: ``c3``, ``c003`` or ``cam3`` at the start or after ``_``). A file with neither
      is an error.
    """

    name = "folder"
    cameras_file = "cameras.csv"
    extensible_modalities = True  # data.modality_dirs names a modality's folder
    config_keys = ("camera_pattern",)

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities, cfg.camera_pattern, cfg.modality_dirs)

    @classmethod
    def load(cls, root: Optional[str], modalities_: Sequence[str], camera_pattern: str = DEFAULT_CAMERA_PATTERN,
             modality_dirs: Optional[Dict[str, str]] = None) -> ReIDData:
        if not root:
            raise DataError("data.root is not set: point it at your folder that holds train/, query/ and gallery/ "
                            "(data.name=folder)")
        missing = [s for s in SPLITS if not os.path.isdir(os.path.join(root, s))]
        if missing:
            raise DataError(f"data.root={root!r} has no {', '.join(m + '/' for m in missing)} folder: data.name=folder "
                            "reads ROOT/{train,query,gallery}/<modality>/<pid>/<image>")
        pattern = compile_camera_pattern(camera_pattern)
        mods = [modalities.canonical(m) for m in modalities_]
        if any(is_text(m) for m in mods):
            raise DataError(f"data.modalities={mods}: the folder data set reads images; captions (text) need a "
                            "manifest's text column (data.name=manifest)")
        folders = cls._modality_folders(root, modality_dirs)
        for split in SPLITS:
            lacking = [m for m in mods if m not in folders[split]]
            if lacking:
                have = ", ".join(f"{d}/ ({m})" for m, d in folders[split].items())
                raise DataError(f"{os.path.join(root, split)} has no folder for modality {lacking[0]!r} (it has "
                                f"{have or 'none'}); set data.modalities to the modalities you have, e.g. "
                                f"data.modalities=[{','.join(folders[split]) or 'rgb'}]")
        cameras = cls._read_cameras(root)
        problems = Problems(root, "every problem is listed; fix them and run again")
        found = {split: cls._pair(root, split, {m: folders[split][m] for m in mods}, problems) for split in SPLITS}
        labels: Dict[Tuple[str, str, str], str] = {}
        for split, keys in found.items():
            for (pid, stem), paths in keys.items():
                cam = cls._camera(root, stem, paths, cameras, pattern, problems)
                if cam is not None:
                    labels[(split, pid, stem)] = cam
        problems.raise_if_any()

        pid_names = {pid for keys in found.values() for pid, _ in keys}
        pid_of = ({p: int(p) for p in pid_names} if all(re.fullmatch(r"-?\d+", p) for p in pid_names)
                  else number_labels(pid_names))
        cam_of = number_labels(labels.values())
        splits = {split: [Sample(paths, pid_of[pid], cam_of[labels[(split, pid, stem)]])
                          for (pid, stem), paths in sorted(keys.items())] for split, keys in found.items()}
        train = relabel(splits["train"])
        for ss in (train, splits["query"], splits["gallery"]):
            check_readable(ss)
        return ReIDData(train, splits["query"], splits["gallery"], mods, num_cams=len(cam_of), name=cls.name)

    @staticmethod
    def _modality_folders(root: str, modality_dirs: Optional[Dict[str, str]]) -> Dict[str, Dict[str, str]]:
        """``{split: {modality: folder name}}``; every folder of a split must name a modality."""
        explicit = {folder: modalities.canonical(m) for m, folder in (modality_dirs or {}).items()}
        out: Dict[str, Dict[str, str]] = {}
        unknown: List[str] = []
        for split in SPLITS:
            d = os.path.join(root, split)
            out[split] = {}
            for name in sorted(os.listdir(d)):
                if name.startswith(".") or not os.path.isdir(os.path.join(d, name)):
                    continue
                try:
                    m = explicit.get(name) or modalities.canonical(name)
                except ValueError:
                    unknown.append(f"{split}/{name}")
                    continue
                if m in out[split]:
                    raise DataError(f"{d}: the folders {out[split][m]}/ and {name}/ are both modality {m!r}; keep one, "
                                    "or map the one to read with data.modality_dirs")
                out[split][m] = name
        if unknown:
            name = unknown[0].split("/")[1]
            raise DataError(f"{root}: unknown modality folder(s) {', '.join(unknown)}: every folder of a split is a "
                            f"modality named by its name or an alias. To use {name!r}, {declare_hint(name)}; to read "
                            f"it as a known modality set data.modality_dirs (e.g. data.modality_dirs={{nir: {name}}}); "
                            "or move the folder out of ROOT")
        return out

    @staticmethod
    def _pair(root: str, split: str, folders: Dict[str, str], problems: Problems
              ) -> Dict[Tuple[str, str], Dict[str, str]]:
        """``{(pid folder, file stem): {modality: path}}`` of one split; unpaired files, images outside a
        ``<pid>/`` folder and stems used twice go to ``problems``."""
        found: Dict[str, Dict[Tuple[str, str], str]] = {}
        for m, folder in folders.items():
            d = os.path.join(root, split, folder)
            files: Dict[Tuple[str, str], str] = {}
            for pid in sorted(os.listdir(d)):
                pdir = os.path.join(d, pid)
                if pid.startswith("."):
                    continue
                if not os.path.isdir(pdir):
                    if pid.lower().endswith(IMAGE_EXTENSIONS):
                        problems.add(f"{os.path.relpath(pdir, root)} is not in a <pid>/ folder (images go in "
                                     f"{split}/{folder}/<pid>/)")
                    continue
                for f in list_images(pdir):
                    key = (pid, os.path.splitext(f)[0])
                    if key in files:
                        problems.add(f"{os.path.relpath(files[key], root)} and {f} have the same stem, so neither can "
                                     "be paired; rename one")
                    files[key] = os.path.join(pdir, f)
            found[m] = files
        keys = sorted(set().union(*[set(f) for f in found.values()]))
        if not keys:
            problems.add(f"{split}/ has no images: the {split!r} split is empty")
        out = {}
        for key in keys:
            have = {m: f[key] for m, f in found.items() if key in f}
            if len(have) < len(found):
                lacking = [folders[m] for m in found if m not in have]
                path = next(iter(have.values()))
                problems.add(f"{os.path.relpath(path, root)} has no partner in "
                             f"{', '.join(f'{split}/{x}/{key[0]}/' for x in lacking)} (modalities are paired by "
                             f"<pid>/<file stem>: add {key[1]}.* there, delete it, or drop the modality from "
                             "data.modalities)")
                continue
            out[key] = have
        return out

    @classmethod
    def _read_cameras(cls, root: str) -> Dict[str, str]:
        """``ROOT/cameras.csv`` as ``{path relative to ROOT: camera label}`` (empty without the file);
        every bad line is reported at once."""
        path = os.path.join(root, cls.cameras_file)
        if not os.path.isfile(path):
            return {}
        problems = Problems(path, "its header is file,camera; file is a path relative to data.root, e.g. "
                                  "train/rgb/0001/a.jpg")
        out: Dict[str, str] = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "file" not in header or "camera" not in header:
                problems.add(f"the header {header} needs the columns file and camera", 1)
                problems.raise_if_any()
            fi, ci = header.index("file"), header.index("camera")
            for n, row in csv_rows(reader, len(header), problems):
                file, cam = row[fi].strip(), row[ci].strip()
                key = os.path.normpath(file)
                if not file or not cam:
                    problems.add(f"empty {'file' if not file else 'camera'}", n)
                elif not os.path.isfile(os.path.join(root, key)):
                    problems.add(f"{file} does not exist under {root}", n)
                elif out.get(key, cam) != cam:
                    problems.add(f"{file} is listed twice, with cameras {out[key]!r} and {cam!r}", n)
                else:
                    out[key] = cam
        problems.raise_if_any()
        return out

    @staticmethod
    def _camera(root: str, stem: str, paths: Dict[str, str], cameras: Dict[str, str], pattern: "re.Pattern",
                problems: Problems) -> Optional[str]:
        """The camera label of one sample: cameras.csv's for any of its files, else ``pattern`` on the stem."""
        rels = [os.path.normpath(os.path.relpath(p, root)) for p in paths.values()]
        listed = {cameras[r] for r in rels if r in cameras}
        if len(listed) > 1:
            problems.add(f"cameras.csv gives the files of one sample ({', '.join(rels)}) different cameras "
                         f"{sorted(listed)}")
            return None
        if listed:
            return listed.pop()
        m = pattern.search(stem)
        if m is None or m.group("camera") is None:
            problems.add(f"{rels[0]}: no camera: cameras.csv does not list it and its name does not match "
                         f"data.camera_pattern={pattern.pattern!r}")
            return None
        return m.group("camera")


def _text(value) -> str:
    return "" if value is None else str(value).strip()


@DATASETS.register("manifest")
class ManifestSet:
    """One row per sample in a CSV (header line) or JSON-lines file (one object per line).

    * **Columns** (keys): ``split`` (``train``, ``query`` or ``gallery``), ``pid`` (an integer >= 0),
      ``camera`` (any label) and one per modality, named by the modality or an alias: an image
      path, or for ``text`` the caption. Any other column is an error saying how to declare it as a
      modality. Columns of modalities not in ``data.modalities`` are not read.
    * **Where**: ``data.manifest`` (a relative one is read against ``data.root``); null = the
      ``manifest.csv`` (else ``manifest.jsonl``) in ``data.root``.
    * **Paths** in the rows are relative to **the manifest's own folder** (so the file travels with its
      images), or absolute.
    * Every bad row — unknown split, bad pid, empty camera, a missing or unreadable image, a missing
      column, an unknown modality column, a line that is not JSON — is reported at once, each with
      its line number (the CSV header is line 1), in one :class:`DataError` before training starts.
    """

    name = "manifest"
    required = ("split", "pid", "camera")
    default_files = ("manifest.csv", "manifest.jsonl")
    config_keys = ("manifest",)

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities, cfg.manifest)

    @classmethod
    def locate(cls, root: Optional[str], manifest: Optional[str]) -> str:
        """The manifest file ``data.manifest`` / ``data.root`` point to."""
        if manifest is None:
            if not root:
                raise DataError("data.manifest and data.root are not set: set data.manifest=PATH (a .csv or .jsonl "
                                "file), or data.root to the folder that holds manifest.csv")
            for f in cls.default_files:
                if os.path.isfile(os.path.join(root, f)):
                    return os.path.join(root, f)
            raise DataError(f"data.root={root!r} has no {' or '.join(cls.default_files)}; write one there or set "
                            "data.manifest=PATH")
        path = manifest if os.path.isabs(manifest) or not root else os.path.join(root, manifest)
        if not os.path.isfile(path):
            raise DataError(f"data.manifest={manifest!r}: {path} does not exist"
                            + (" (a relative data.manifest is read against data.root)" if path != manifest else ""))
        return path

    @classmethod
    def load(cls, root: Optional[str], modalities_: Sequence[str], manifest: Optional[str] = None) -> ReIDData:
        path = cls.locate(root, manifest)
        mods = [modalities.canonical(m) for m in modalities_]
        if all(is_text(m) for m in mods):
            raise DataError(f"data.modalities={mods}: add at least one image modality")
        base = os.path.dirname(os.path.abspath(path))
        problems = Problems(path, "every bad line is listed; fix or delete them and run again")
        header, rows = cls._rows(path, problems)
        word = "column" if header is not None else "key"
        columns = cls._columns(header, mods, problems, 1, word) if header is not None else None
        readable: Dict[str, Optional[str]] = {}
        parsed: List[Tuple[str, int, str, Dict[str, str], Optional[str]]] = []
        seen_splits = set()
        for n, row in rows:
            cols = columns if columns is not None else cls._columns(list(row), mods, problems, n, word)
            split = _text(row.get("split")).lower()
            if "split" in row and split not in SPLITS:
                problems.add(f"unknown split {row.get('split')!r} (train, query or gallery)", n)
            seen_splits.add(split)
            raw_pid = row.get("pid")
            pid = raw_pid if isinstance(raw_pid, int) and not isinstance(raw_pid, bool) else \
                int(_text(raw_pid)) if re.fullmatch(r"\d+", _text(raw_pid)) else None
            if "pid" in row and (pid is None or pid < 0):
                problems.add(f"bad pid {raw_pid!r}: an integer >= 0", n)
            camera = _text(row.get("camera"))
            if "camera" in row and not camera:
                problems.add("empty camera", n)
            paths, text = {}, None
            for col, m in cols.items():
                if m not in mods or col not in row:
                    continue
                value = _text(row.get(col))
                if is_text(m):
                    text = value
                    if not value:
                        problems.add(f"empty {col} (the caption)", n)
                    continue
                if not value:
                    problems.add(f"no {m} image ({word} {col!r} is empty)", n)
                    continue
                file = value if os.path.isabs(value) else os.path.join(base, value)
                if file not in readable:
                    readable[file] = _unreadable(file)
                if readable[file]:
                    problems.add(f"{m} image {value}: {readable[file]}", n)
                    continue
                paths[m] = file
            parsed.append((split, pid, camera, paths, text))  # used only when no line has a problem
        for split in SPLITS:
            if split not in seen_splits:
                problems.add(f"no {split} rows: the {split!r} split is empty")
        problems.raise_if_any()

        cam_of = number_labels(c for _, _, c, _, _ in parsed)
        splits: Dict[str, List[Sample]] = {s: [] for s in SPLITS}
        for split, pid, camera, paths, text in parsed:
            splits[split].append(Sample(paths, pid, cam_of[camera], text=text))
        return ReIDData(relabel(splits["train"]), splits["query"], splits["gallery"], mods, num_cams=len(cam_of),
                        name=cls.name)

    @staticmethod
    def _rows(path: str, problems: Problems) -> Tuple[Optional[List[str]], List[Tuple[int, Dict[str, object]]]]:
        """``(CSV header or None, [(line number, row)])``; lines that are not rows go to ``problems``."""
        ext = os.path.splitext(path)[1].lower()
        rows: List[Tuple[int, Dict[str, object]]] = []
        if ext == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = [h.strip() for h in next(reader, [])]
                if not header:
                    raise DataError(f"{path} is empty: a manifest starts with a header such as split,pid,camera,rgb")
                for n, values in csv_rows(reader, len(header), problems):
                    rows.append((n, dict(zip(header, values))))
            return header, rows
        if ext in (".jsonl", ".ndjson", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        problems.add(f"not valid JSON ({e})", n)
                        continue
                    if not isinstance(row, dict):
                        problems.add("not a JSON object {\"split\": ..., \"pid\": ..., \"camera\": ..., ...}", n)
                        continue
                    rows.append((n, {str(k).strip(): v for k, v in row.items()}))
            return None, rows
        raise DataError(f"data.manifest: {path} is neither .csv nor .jsonl (JSON lines); rename it to what it holds")

    @classmethod
    def _columns(cls, names: Sequence[str], mods: Sequence[str], problems: Problems, line: int, word: str
                 ) -> Dict[str, str]:
        """``{column: modality}`` of a header (CSV) or a row's keys (JSON lines); problems at ``line``."""
        out: Dict[str, str] = {}
        for name in names:
            if name in cls.required:
                continue
            try:
                m = modalities.canonical(name)
            except ValueError:
                problems.add(f"{word} {name!r} is not a known modality (a manifest has split, pid, camera and one "
                             f"{word} per modality); {declare_hint(name)}", line)
                continue
            other = next((c for c, x in out.items() if x == m), None)
            if other is not None:
                problems.add(f"{word}s {other!r} and {name!r} are both modality {m!r}; keep one", line)
            out[name] = m
        for c in cls.required:
            if c not in names:
                problems.add(f"missing {word} {c!r} (a manifest needs split, pid, camera and one {word} per "
                             "modality)", line)
        for m in mods:
            if m not in out.values():
                problems.add(f"no {word} for modality {m!r} (data.modalities={list(mods)}); add one, or drop {m!r} "
                             "from data.modalities", line)
        return out


def _unreadable(path: str) -> Optional[str]:
    """Why ``path`` is not a readable image (it does not exist, or its header does not decode), or None."""
    if not os.path.isfile(path):
        return f"{path} does not exist"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reading the header is the check
    except Exception as e:  # PIL raises several types for a bad file
        return f"{path} is not a readable image ({type(e).__name__}: {e})"
    return None
