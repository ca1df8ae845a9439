"""Data sets: file lists with pid / camera labels, one path per modality per sample.

Each data set is registered by name (``data.name``) and exposes ``train``, ``query`` and
``gallery`` lists of :class:`Sample`. Everything is checked when the data set is built, before any
training starts: a missing folder, an unpaired file, an empty split or an unreadable image is one
error that names the path.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

from PIL import Image

from ..registry import Registry

logger = logging.getLogger(__name__)

MODALITY_ALIASES = {"vis": "rgb", "rgb": "rgb", "ni": "nir", "nir": "nir", "ir": "ir", "th": "tir", "ti": "tir",
                    "tir": "tir", "sk": "sketch", "sketch": "sketch", "cp": "cpencil", "cpencil": "cpencil",
                    "text": "text"}


def canonical_modality(name: str) -> str:
    """``vis`` -> ``rgb``, ``ni`` -> ``nir``, ``th``/``ti`` -> ``tir``, ``sk`` -> ``sketch``, ``cp`` -> ``cpencil``;
    ``ir`` (a thermal/near-IR camera of IR-RGB data sets) stays its own modality."""
    try:
        return MODALITY_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {sorted(set(MODALITY_ALIASES.values()))} "
                         f"(aliases: {sorted(MODALITY_ALIASES)})") from None


class DataError(ValueError):
    """Bad data on disk: the message names the path and what to do."""


class Sample(NamedTuple):
    """One multi-modal sample: ``paths[modality]`` (images), identity, camera (0-based), view and
    caption (the ``text`` modality, or None)."""

    paths: Dict[str, str]
    pid: int
    camid: int
    viewid: int = 0
    text: Optional[str] = None


@dataclass
class ReIDData:
    """Train / query / gallery splits of a data set.

    Attributes:
        train: training samples, pids relabelled to 0..num_train_pids-1.
        query, gallery: test samples with their original pids (the same list for RGBNT201).
        modalities: the modalities each sample has a path for.
        num_cams: cameras over all splits (camids are 0..num_cams-1).
        num_views: views (0 when the data set has none).
    """

    train: List[Sample]
    query: List[Sample]
    gallery: List[Sample]
    modalities: List[str]
    num_cams: int
    num_views: int = 0

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def shared_query_gallery(self) -> bool:
        return self.query is self.gallery

    def summary(self) -> str:
        rows = [("train", self.train), ("query", self.query)]
        if not self.shared_query_gallery:
            rows.append(("gallery", self.gallery))
        parts = [f"{n}: {len({s.pid for s in ss})} ids / {len(ss)} samples" for n, ss in rows]
        return f"{', '.join(parts)}; cameras {self.num_cams}; modalities {self.modalities}"


DATASETS: Registry = Registry("data set")


def check_readable(samples: Sequence[Sample]) -> None:
    """Open every image's header (fast, no decoding); raise :class:`DataError` naming the first bad file."""
    for s in samples:
        for path in s.paths.values():
            try:
                with Image.open(path) as im:
                    im.size  # noqa: B018 - reading the header is the check
            except Exception as e:  # PIL raises several types for a bad file
                raise DataError(f"unreadable image {path}: {type(e).__name__}: {e}; "
                                "re-extract or delete the file") from None


def relabel(samples: List[Sample]) -> List[Sample]:
    """Map pids to 0..N-1 in sorted order (training labels)."""
    pid2label = {p: i for i, p in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=pid2label[s.pid]) for s in samples]


@DATASETS.register("rgbnt201")
class RGBNT201:
    """RGBNT201 as released: ``ROOT/RGBNT201/{train_171,test}/{RGB,NI,TI}/<pid:06d>_cam<c>_*.jpg``.

    The modalities are paired by identical file name; pid = the first 6 digits, camid = the digit
    after ``cam`` minus 1 (as TOP-ReID / MambaPro parse it); query = gallery = ``test``. The
    ``text`` modality reads ``RGBNT201/captions.json`` (``{"<pid:06d>": caption}``; the synthetic
    set writes one, the released RGBNT201 has none).
    """

    folder = "RGBNT201"
    splits = {"train": "train_171", "test": "test"}
    modality_dirs = {"rgb": "RGB", "nir": "NI", "tir": "TI"}

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        """Build from the ``data`` config section."""
        if not cfg.root:
            raise DataError(f"data.root is not set: point it at the folder that contains {cls.folder}/ "
                            "(e.g. data.root=/datasets), or use data.name=synthetic")
        return cls.load(cfg.root, cfg.modalities)

    @classmethod
    def load(cls, root: str, modalities: Sequence[str]) -> ReIDData:
        base = os.path.join(root, cls.folder)
        if not os.path.isdir(base):
            raise DataError(f"data.root={root!r} has no {cls.folder}/ folder; download {cls.folder} and set "
                            f"data.root to the folder that contains it (or use data.name=synthetic)")
        mods = [canonical_modality(m) for m in modalities]
        for m in mods:
            if m not in cls.modality_dirs and m != "text":
                raise DataError(f"{cls.folder} has no modality {m!r}; it has {list(cls.modality_dirs) + ['text']}")
        image_mods = [m for m in mods if m != "text"]
        if not image_mods:
            raise DataError(f"data.modalities={mods}: {cls.folder} samples are images; add at least one image modality")
        captions = cls._read_captions(base) if "text" in mods else None
        train = cls._read_split(base, cls.splits["train"], image_mods, captions)
        test = cls._read_split(base, cls.splits["test"], image_mods, captions)
        train = relabel(train)
        check_readable(train)
        check_readable(test)
        num_cams = max(s.camid for s in train + test) + 1
        return ReIDData(train=train, query=test, gallery=test, modalities=mods, num_cams=num_cams)

    @classmethod
    def parse_name(cls, name: str):
        """``000123_cam4_...jpg`` -> (123, 3)."""
        head, cam = name.split("_")[:2]
        return int(head[:6]), int(cam[3]) - 1

    @classmethod
    def _read_captions(cls, base: str) -> Dict[int, str]:
        path = os.path.join(base, "captions.json")
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: the text modality needs captions ({{\"<pid:06d>\": caption}}); "
                            "drop 'text' from data.modalities")
        try:
            with open(path) as f:
                return {int(k): str(v) for k, v in json.load(f).items()}
        except (ValueError, AttributeError) as e:
            raise DataError(f"{path} is not a JSON object of pid -> caption: {e}") from None

    @classmethod
    def _read_split(cls, base: str, split: str, mods: List[str],
                    captions: Optional[Dict[int, str]] = None) -> List[Sample]:
        split_dir = os.path.join(base, split)
        names: Dict[str, List[str]] = {}
        for m in mods:
            d = os.path.join(split_dir, cls.modality_dirs[m])
            if not os.path.isdir(d):
                raise DataError(f"{d} is missing (needed for modality {m!r}); check the extraction of "
                                f"{cls.folder} or drop {m!r} from data.modalities")
            names[m] = sorted(f for f in os.listdir(d) if f.lower().endswith((".jpg", ".jpeg", ".png")))
            if not names[m]:
                raise DataError(f"{d} has no images: the {split!r} split is empty")
        first = mods[0]
        for m in mods[1:]:
            a, b = set(names[first]), set(names[m])
            if a != b:
                only_a, only_b = sorted(a - b), sorted(b - a)
                if only_a:
                    missing = os.path.join(split_dir, cls.modality_dirs[m], only_a[0])
                    have = os.path.join(split_dir, cls.modality_dirs[first], only_a[0])
                else:
                    missing = os.path.join(split_dir, cls.modality_dirs[first], only_b[0])
                    have = os.path.join(split_dir, cls.modality_dirs[m], only_b[0])
                raise DataError(f"{missing} is missing: {have} has no partner "
                                f"({len(only_a) + len(only_b)} unpaired file(s) in {split_dir}); "
                                "modalities are paired by identical file names")
        samples = []
        for name in names[first]:
            try:
                pid, camid = cls.parse_name(name)
            except (ValueError, IndexError):
                raise DataError(f"cannot parse pid/camera from {os.path.join(split_dir, name)}: expected "
                                "<pid:06d>_cam<c>_*.jpg") from None
            paths = {m: os.path.join(split_dir, cls.modality_dirs[m], name) for m in mods}
            text = None
            if captions is not None:
                if pid not in captions:
                    raise DataError(f"{os.path.join(base, 'captions.json')} has no caption for pid {pid:06d} "
                                    f"({os.path.join(split_dir, name)})")
                text = captions[pid]
            samples.append(Sample(paths, pid, camid, text=text))
        return samples


@DATASETS.register("market1501")
class Market1501:
    """Market-1501: ``{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>s<seq>_*.jpg``, RGB only.

    ``data.root`` may hold the three folders directly, or under ``Market-1501-v15.09.15/``,
    ``market1501/`` or ``market1501/Market-1501-v15.09.15/`` (torchreid's layout). Junk images
    (pid -1) are dropped, distractors (pid 0) stay in the gallery, camera = the digit after ``c``
    minus 1, training pids are relabelled — as torchreid and fast-reid read it.
    """

    subdirs = ("", "Market-1501-v15.09.15", "market1501", os.path.join("market1501", "Market-1501-v15.09.15"))
    splits = ("bounding_box_train", "query", "bounding_box_test")
    pattern = re.compile(r"([-\d]+)_c(\d)")

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        if not cfg.root:
            raise DataError("data.root is not set: point it at the folder that contains Market-1501-v15.09.15/ "
                            "(or bounding_box_train/, query/, bounding_box_test/)")
        return cls.load(cfg.root, cfg.modalities)

    @classmethod
    def load(cls, root: str, modalities: Sequence[str]) -> ReIDData:
        mods = [canonical_modality(m) for m in modalities]
        if mods != ["rgb"]:
            raise DataError(f"market1501 has only the rgb modality; set data.modalities=[rgb] (got {mods})")
        base = next((os.path.join(root, d) for d in cls.subdirs
                     if os.path.isdir(os.path.join(root, d, "bounding_box_train"))), None)
        if base is None:
            raise DataError(f"data.root={root!r} has no bounding_box_train/ (looked in "
                            f"{', '.join(os.path.join(root, d) or root for d in cls.subdirs)}); extract "
                            "Market-1501-v15.09.15.zip there")
        train, query, gallery = (cls._read(base, split) for split in cls.splits)
        train = relabel(train)
        for split_samples in (train, query, gallery):
            check_readable(split_samples)
        num_cams = max(s.camid for s in train + query + gallery) + 1
        return ReIDData(train=train, query=query, gallery=gallery, modalities=["rgb"], num_cams=num_cams)

    @classmethod
    def _read(cls, base: str, split: str) -> List[Sample]:
        d = os.path.join(base, split)
        if not os.path.isdir(d):
            raise DataError(f"{d} is missing; Market-1501 has {', '.join(cls.splits)}")
        samples = []
        for name in sorted(f for f in os.listdir(d) if f.lower().endswith(".jpg")):
            m = cls.pattern.search(name)
            if m is None:
                raise DataError(f"cannot parse pid/camera from {os.path.join(d, name)}: expected <pid>_c<cam>s*.jpg")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                continue  # junk
            samples.append(Sample({"rgb": os.path.join(d, name)}, pid, cam - 1))
        if not samples:
            raise DataError(f"{d} has no images: the {split!r} split is empty")
        return samples


def default_cache_dir() -> str:
    return os.environ.get("HYBRID_REID_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hybrid_reid"))


@DATASETS.register("synthetic")
class Synthetic(RGBNT201):
    """The embedded synthetic set (:mod:`hybrid_reid.data.synth`), generated on first use.

    ``data.root`` null puts it in ``$HYBRID_REID_CACHE`` (default ``~/.cache/hybrid_reid``) under a
    name that encodes the generator's parameters; ``data.synth`` holds them.
    """

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities, cfg.synth)

    @classmethod
    def load(cls, root: Optional[str], modalities: Sequence[str], spec=None) -> ReIDData:
        from .synth import SynthSpec, ensure_generated

        spec = spec or SynthSpec()
        if root is None:
            tag = f"ids{spec.ids}-cams{spec.cams}-k{spec.images_per_cam}-t{spec.test_fraction}-" \
                  f"s{spec.seed}-{spec.size[0]}x{spec.size[1]}"
            root = os.path.join(default_cache_dir(), "synthetic", tag)
        ensure_generated(root, spec)
        return super().load(root, modalities)


def load_data(cfg) -> ReIDData:
    """The data set the ``data`` config section names, checked (see :class:`DataError`)."""
    try:
        cls = DATASETS.get(cfg.name)
    except KeyError as e:
        raise DataError(f"data.name: {e.args[0]}") from None
    return cls.from_config(cfg)
