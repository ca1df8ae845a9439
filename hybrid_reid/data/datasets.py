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
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

from .. import modalities
from ..modalities import TEXT, is_text
from ..registry import Registry

logger = logging.getLogger(__name__)

def canonical_modality(name: str) -> str:
    """``vis`` -> ``rgb``, ``ni`` -> ``nir``, ``th``/``ti`` -> ``tir``, ``sk`` -> ``sketch``, ``cp`` -> ``cpencil``;
    ``ir`` (a thermal/near-IR camera of IR-RGB data sets) stays its own modality. Declared modalities
    (the config's ``modalities:`` section) resolve too (:mod:`hybrid_reid.modalities`)."""
    return modalities.canonical(name)


class DataError(ValueError):
    """Bad data on disk: the message names the path and what to do."""


class Sample(NamedTuple):
    """One multi-modal sample.

    Attributes:
        paths: ``{modality: image file}`` for the image modalities it has.
        pid, camid, viewid: identity, camera (0-based) and view.
        text: the caption (the ``text`` modality), or None.
        sceneid: the scene (MSVR310; -1 elsewhere), for ``eval.protocol: msvr310``.
        crops: ``{modality: (part, parts)}``: the modality is part ``part`` of ``parts`` equal-width
            strips of its file (RGBNT100 stores RGB | NI | TI side by side in one jpg).
        pools: ``{modality: files}``: unpaired modalities (ORBench) whose image is drawn from these
            files of the same identity at every training step; ``paths`` holds the first one,
            which evaluation uses.
        captions: ``{image modality: description}``: a caption of each modality's own image (IDEA's
            per-modality captions, ``data.modality_captions``), or None.
    """

    paths: Dict[str, str]
    pid: int
    camid: int
    viewid: int = 0
    text: Optional[str] = None
    sceneid: int = -1
    crops: Optional[Dict[str, Tuple[int, int]]] = None
    pools: Optional[Dict[str, Tuple[str, ...]]] = None
    captions: Optional[Dict[str, str]] = None

    @property
    def modalities(self) -> List[str]:
        """The modalities this sample has (image modalities, then ``text`` when captioned)."""
        return list(self.paths) + ([TEXT] if self.text is not None else [])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
#: ``data.camera_pattern``'s default (the ``folder`` data set): ``c3``, ``c003`` or ``cam3`` at the start
#: of the file name or after an ``_`` (Market-1501, VeRi-776 and RGBNT201 names).
DEFAULT_CAMERA_PATTERN = r"(?:^|_)c(?:am)?(?P<camera>\d+)"


def open_image(path: str, crop: Optional[Tuple[int, int]] = None) -> Image.Image:
    """The image at ``path`` as RGB; ``crop = (part, parts)`` takes that equal-width vertical strip."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if crop is not None:
        part, parts = crop
        w = im.width // parts
        im = im.crop((part * w, 0, (part + 1) * w, im.height))
    return im


def list_images(folder: str) -> List[str]:
    """Image file names in ``folder``, sorted."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


@dataclass
class ReIDData:
    """Train / query / gallery splits of a data set.

    Attributes:
        train: training samples, pids relabelled to 0..num_train_pids-1.
        query, gallery: test samples with their original pids (the same list for RGBNT201).
        modalities: the modalities each sample has a path for.
        num_cams: cameras over all splits (camids are 0..num_cams-1).
        num_views: views (0 when the data set has none).
        query_sets: ``{name: samples}`` several query sets, each with its own modalities, against
            one gallery (ORBench: ``"nir"``, ``"cpencil+sketch+text"``, ...); ``query`` is then the
            first of them. None for data sets with one query set.
        name: the data set's name (``data.name``), for messages and tables.
        protocol: the evaluation protocol its papers use (``eval.protocol``).
    """

    train: List[Sample]
    query: List[Sample]
    gallery: List[Sample]
    modalities: List[str]
    num_cams: int
    num_views: int = 0
    query_sets: Optional[Dict[str, List[Sample]]] = None
    name: str = ""
    protocol: str = "market"

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def shared_query_gallery(self) -> bool:
        return self.query is self.gallery

    def splits(self) -> List[Tuple[str, List[Sample]]]:
        """``(name, samples)`` of every split: train, query (or each query set), gallery."""
        rows = [("train", self.train)]
        if self.query_sets is not None:
            rows += [(f"query {n}", q) for n, q in self.query_sets.items()]
        else:
            rows.append(("query" if not self.shared_query_gallery else "query = gallery", self.query))
        if not self.shared_query_gallery:
            rows.append(("gallery", self.gallery))
        return rows

    def summary(self) -> str:
        """One line: ids and samples per split, cameras, modalities."""
        parts = [f"{n}: {len({s.pid for s in ss})} ids / {len(ss)} samples" for n, ss in self.splits()]
        return f"{', '.join(parts)}; cameras {self.num_cams}; modalities {self.modalities}"

    def summary_table(self) -> str:
        """The peers' statistics table: ids, samples and cameras per split, and images per modality
        (for an unpaired modality: the distinct files it draws from)."""
        rows = []
        for name, ss in self.splits():
            counts = []
            for m in self.modalities:
                if is_text(m):
                    counts.append(sum(s.text is not None for s in ss))
                    continue
                files = set()
                for s in ss:
                    if m in s.paths:
                        files.update(s.pools[m] if s.pools and m in s.pools else (s.paths[m],))
                counts.append(len(files))
            rows.append([name, len({s.pid for s in ss}), len(ss), len({s.camid for s in ss}), *counts])
        header = ["subset", "# ids", "# samples", "# cameras", *[f"# {m}" for m in self.modalities]]
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  " + " | ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                          for i, (v, w) in enumerate(zip(r, widths)))
        rule = "  " + "-" * (sum(widths) + 3 * (len(widths) - 1))
        return "\n".join([f"=> {self.name or 'data set'} loaded", "Dataset statistics:", rule, fmt(header), rule,
                          *[fmt(r) for r in rows], rule])


DATASETS: Registry = Registry("data set")


def check_readable(samples: Sequence[Sample]) -> None:
    """Open every image's header (fast, no decoding); raise :class:`DataError` naming the first bad file."""
    seen = set()
    for s in samples:
        for m, path in s.paths.items():
            for p in (s.pools[m] if s.pools and m in s.pools else (path,)):
                if p in seen:
                    continue
                seen.add(p)
                try:
                    with Image.open(p) as im:
                        im.size  # noqa: B018 - reading the header is the check
                except Exception as e:  # PIL raises several types for a bad file
                    raise DataError(f"unreadable image {p}: {type(e).__name__}: {e}; "
                                    "re-extract or delete the file") from None


def relabel(samples: List[Sample]) -> List[Sample]:
    """Map pids to 0..N-1 in sorted order (training labels)."""
    pid2label = {p: i for i, p in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=pid2label[s.pid]) for s in samples]


def number_labels(labels: Iterable[str]) -> Dict[str, int]:
    """Labels (camera names, identity folder names ...) -> 0..N-1 in sorted order: numerically when
    every label is an integer (``1``..``6`` -> 0..5; ``007`` and ``7`` are the same), else as strings."""
    labels = set(labels)
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        index = {v: i for i, v in enumerate(sorted({int(x) for x in labels}))}
        return {x: index[int(x)] for x in labels}
    return {x: i for i, x in enumerate(sorted(labels))}


class Problems:
    """Problems found in one file or folder, collected so that they are reported all at once (one
    :class:`DataError`) instead of one per run.

    Args:
        where: the file or folder, as the message names it.
        fix: what to do, appended to the message's first line.
    """

    max_shown = 200

    def __init__(self, where: str, fix: str) -> None:
        self.where, self.fix = where, fix
        self.items: List[Tuple[Optional[int], str]] = []

    def add(self, message: str, line: Optional[int] = None) -> None:
        self.items.append((line, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        items = sorted(self.items, key=lambda x: (x[0] is None, x[0] or 0))  # by line; stable
        lines = {x[0] for x in items if x[0] is not None}
        count = f"{len(items)} problem(s)" + (f" on {len(lines)} line(s)" if lines else "")
        shown = [f"  line {n}: {m}" if n is not None else f"  {m}" for n, m in items[:self.max_shown]]
        if len(items) > self.max_shown:
            shown.append(f"  ... and {len(items) - self.max_shown} more")
        raise DataError("\n".join([f"{self.where}: {count}; nothing was loaded ({self.fix}):", *shown]))


#: the file tag of a modality in per-modality caption files (IDEA's ``text/{train,test}_{RGB,NI,TI}.json``);
#: a modality declared in the config uses its folder name (``data.modality_dirs``)
CAPTION_TAGS = {"rgb": "RGB", "nir": "NI", "tir": "TI"}


def read_caption_file(path: str) -> Dict[str, str]:
    """A caption file (a JSON list of ``{"item": <image file name>, "description": <text>}``) as
    ``{item: description}``; when an item is listed twice the first entry counts (as a linear search)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: data.modality_captions reads one caption file per split and image "
                        "modality (IDEA's QwenVL_Anno/<DATASET>/text/*.json belong in <DATASET>/text/); copy them "
                        "there or set data.modality_captions=false")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{\"item\": <image file name>, \"description\": <text>}}")
    out: Dict[str, str] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("item"), str) or not isinstance(e.get("description"), str):
            raise DataError(f"{path}: entry {i} is not {{\"item\": <image file name>, \"description\": <text>}}: "
                            f"{str(e)[:200]}")
        out.setdefault(e["item"], e["description"])
    return out


def attach_captions(samples: List[Sample], text_dir: str, split: str, mods: Sequence[str],
                    tags: Optional[Dict[str, str]] = None, missing: str = "error") -> List[Sample]:
    """Each sample with ``captions``: per image modality m, the description of the entry of
    ``text_dir/<split>_<tag of m>.json`` whose ``item`` is the sample's image file name (the name its
    modalities share; RGBNT100's one three-strip file). ``split`` is ``train`` or ``test``. A sample
    without an entry is an error naming the file and the image, or (``missing="empty"``, IDEA's own
    behaviour) gets an empty description, counted in one warning."""
    tags = {**CAPTION_TAGS, **(tags or {})}
    image_mods = modalities_module_image(mods)
    files = {m: os.path.join(text_dir, f"{split}_{tags.get(m, m)}.json") for m in image_mods}
    tables = {m: read_caption_file(p) for m, p in files.items()}
    lacking, out = 0, []
    for s in samples:
        name = os.path.basename(next(iter(s.paths.values())))
        caps = {}
        for m in image_mods:
            text = tables[m].get(name)
            if text is None:
                if missing != "empty":
                    raise DataError(f"{files[m]} has no caption for {name} ({s.paths[m]}); add an entry with "
                                    f"item {name!r}, or set data.missing_caption=empty (an empty description, as "
                                    "IDEA's reader gives)")
                text, lacking = "", lacking + 1
            caps[m] = text
        out.append(s._replace(captions=caps))
    if lacking:
        logger.warning("%d caption(s) missing from %s: empty descriptions used (data.missing_caption=empty)", lacking,
                       os.path.join(text_dir, f"{split}_*.json"))
    return out


@DATASETS.register("rgbnt201")
class RGBNT201:
    """RGBNT201 as released: ``ROOT/RGBNT201/{train_171,test}/{RGB,NI,TI}/<pid:06d>_cam<c>_*.jpg``.

    The modalities are paired by identical file name; pid = the first 6 digits, camid = the digit
    after ``cam`` minus 1 (as TOP-ReID / MambaPro parse it); query = gallery = ``test``. The
    ``text`` modality reads ``RGBNT201/captions.json`` (``{"<pid:06d>": caption}``; the synthetic
    set writes one, the released RGBNT201 has none). ``data.modality_captions`` reads a caption per
    image modality from ``RGBNT201/text/{train,test}_{RGB,NI,TI}.json`` (IDEA's), matched by file name.
    """

    folder = "RGBNT201"
    splits = {"train": "train_171", "test": "test"}
    modality_dirs = {"rgb": "RGB", "nir": "NI", "tir": "TI"}
    extensible_modalities = True  # data.modality_dirs adds folders
    has_modality_captions = True  # data.modality_captions: <folder>/text/{train,test}_<tag>.json

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        """Build from the ``data`` config section."""
        if not cfg.root:
            raise DataError(f"data.root is not set: point it at the folder that contains {cls.folder}/ "
                            "(e.g. data.root=/datasets), or use data.name=synthetic")
        return cls.load(cfg.root, cfg.modalities, getattr(cfg, "modality_dirs", None), **caption_options(cfg))

    @classmethod
    def load(cls, root: str, modalities: Sequence[str], modality_dirs: Optional[Dict[str, str]] = None,
             modality_captions: bool = False, missing_caption: str = "error") -> ReIDData:
        """``modality_dirs`` adds (or renames) modality folders, e.g. ``{depth: Depth}``;
        ``modality_captions`` reads a caption per image modality (:func:`attach_captions`)."""
        base = os.path.join(root, cls.folder)
        if not os.path.isdir(base):
            raise DataError(f"data.root={root!r} has no {cls.folder}/ folder; download {cls.folder} and set "
                            f"data.root to the folder that contains it (or use data.name=synthetic)")
        dirs = with_extra_dirs(cls.modality_dirs, modality_dirs)
        mods = check_modalities(cls.folder, modalities, [*dirs, TEXT])
        image_mods = modalities_module_image(mods)
        captions = cls._read_captions(base) if TEXT in mods else None
        train = cls._read_split(base, cls.splits["train"], image_mods, captions, dirs)
        test = cls._read_split(base, cls.splits["test"], image_mods, captions, dirs)
        if modality_captions:  # the split is ours to say, not a guess from a path containing "train"
            tags = {m: d for m, d in dirs.items() if m not in CAPTION_TAGS}
            train = attach_captions(train, os.path.join(base, "text"), "train", image_mods, tags, missing_caption)
            test = attach_captions(test, os.path.join(base, "text"), "test", image_mods, tags, missing_caption)
        train = relabel(train)
        check_readable(train)
        check_readable(test)
        num_cams = max(s.camid for s in train + test) + 1
        return ReIDData(train=train, query=test, gallery=test, modalities=mods, num_cams=num_cams,
                        name=cls.__name__.lower())

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
    def _read_split(cls, base: str, split: str, mods: List[str], captions: Optional[Dict[int, str]] = None,
                    modality_dirs: Optional[Dict[str, str]] = None) -> List[Sample]:
        split_dir = os.path.join(base, split)
        folders = modality_dirs or cls.modality_dirs
        dirs = {m: os.path.join(split_dir, folders[m]) for m in mods}
        samples = []
        for name in paired_names(dirs, cls.folder, split):
            try:
                pid, camid = cls.parse_name(name)
            except (ValueError, IndexError):
                raise DataError(f"cannot parse pid/camera from {os.path.join(split_dir, name)}: expected "
                                "<pid:06d>_cam<c>_*.jpg") from None
            paths = {m: os.path.join(d, name) for m, d in dirs.items()}
            text = None
            if captions is not None:
                if pid not in captions:
                    raise DataError(f"{os.path.join(base, 'captions.json')} has no caption for pid {pid:06d} "
                                    f"({os.path.join(split_dir, name)})")
                text = captions[pid]
            samples.append(Sample(paths, pid, camid, text=text))
        return samples


def with_extra_dirs(own: Dict[str, str], extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    """A data set's modality folders plus ``data.modality_dirs`` (names canonical)."""
    out = dict(own)
    for m, d in (extra or {}).items():
        out[canonical_modality(m)] = d
    return out


def caption_options(cfg) -> Dict[str, object]:
    """``data.modality_captions`` / ``data.missing_caption`` as keyword arguments of a reader's ``load``."""
    return {"modality_captions": bool(getattr(cfg, "modality_captions", False)),
            "missing_caption": getattr(cfg, "missing_caption", "error")}


def modalities_module_image(mods: Sequence[str]) -> List[str]:
    return modalities.image_modalities(mods)


def check_modalities(dataset: str, modalities_: Sequence[str], available: Sequence[str]) -> List[str]:
    """``data.modalities`` canonical, checked against what ``dataset`` has, with at least one image modality."""
    mods = [canonical_modality(m) for m in modalities_]
    for m in mods:
        if m not in available:
            raise DataError(f"{dataset} has no modality {m!r}; it has {list(available)} (data.modalities; a new "
                            "image modality also needs its folder in data.modality_dirs)")
    if not any(not is_text(m) for m in mods):
        raise DataError(f"data.modalities={mods}: {dataset} samples are images; add at least one image modality")
    return mods


def paired_names(dirs: Dict[str, str], dataset: str, split: str) -> List[str]:
    """The image names found in every modality folder ``dirs[m]`` (paired by identical name); a
    missing folder, an empty one or a file without its partner is a :class:`DataError` naming it."""
    names: Dict[str, List[str]] = {}
    for m, d in dirs.items():
        if not os.path.isdir(d):
            raise DataError(f"{d} is missing (needed for modality {m!r}); check the extraction of "
                            f"{dataset} or drop {m!r} from data.modalities")
        names[m] = list_images(d)
        if not names[m]:
            raise DataError(f"{d} has no images: the {split!r} split is empty")
    first, *rest = list(dirs)
    for m in rest:
        a, b = set(names[first]), set(names[m])
        if a != b:
            only_a, only_b = sorted(a - b), sorted(b - a)
            if only_a:
                missing, have = os.path.join(dirs[m], only_a[0]), os.path.join(dirs[first], only_a[0])
            else:
                missing, have = os.path.join(dirs[first], only_b[0]), os.path.join(dirs[m], only_b[0])
            raise DataError(f"{missing} is missing: {have} has no partner ({len(only_a) + len(only_b)} unpaired "
                            f"file(s) in {os.path.dirname(dirs[first])}); modalities are paired by identical "
                            "file names")
    return names[first]


def find_base(root: str, candidates: Sequence[str], marker: str, dataset: str, hint: str) -> str:
    """The first ``root/<candidate>`` that contains ``marker``, or a :class:`DataError` listing where it looked."""
    if not root:
        raise DataError(f"data.root is not set: point it at the folder that contains {candidates[0]}/ ({hint})")
    for c in candidates:
        base = os.path.join(root, c)
        if os.path.exists(os.path.join(base, marker)):
            return base
    looked = ", ".join(os.path.join(root, c, marker) for c in candidates)
    raise DataError(f"data.root={root!r} does not hold {dataset}: looked for {looked}; {hint}")


def market_files(base: str, split: str, pattern: "re.Pattern", dataset: str,
                 expected: str) -> List[Tuple[str, int, int]]:
    """``(path, pid, camera as written)`` of the images of ``base/split`` named like Market-1501
    (``pattern`` captures pid and camera); junk (pid -1) is dropped; an empty split is an error."""
    d = os.path.join(base, split)
    if not os.path.isdir(d):
        raise DataError(f"{d} is missing; {dataset} has bounding_box_train, query and bounding_box_test")
    out = []
    for name in list_images(d):
        m = pattern.search(name)
        if m is None:
            raise DataError(f"cannot parse pid/camera from {os.path.join(d, name)}: expected {expected}")
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid != -1:
            out.append((os.path.join(d, name), pid, cam))
    if not out:
        raise DataError(f"{d} has no images: the {split!r} split is empty")
    return out


class SplitFolders:
    """A data set with ``train / query / gallery`` folders (Market-1501 style) under one of
    ``candidates``; subclasses set the class attributes and read a split in :meth:`_read`."""

    name = folder = ""
    protocol = "market"
    candidates: Tuple[str, ...] = ()
    splits: Tuple[str, str, str] = ("bounding_box_train", "query", "bounding_box_test")
    available: Tuple[str, ...] = ()

    has_modality_captions = True  # data.modality_captions: <base>/text/{train,test}_<tag>.json

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities, getattr(cfg, "modality_dirs", None), **caption_options(cfg))

    @classmethod
    def load(cls, root: str, modalities: Sequence[str], modality_dirs: Optional[Dict[str, str]] = None,
             modality_captions: bool = False, missing_caption: str = "error") -> ReIDData:
        dirs = with_extra_dirs(getattr(cls, "modality_dirs", {}), modality_dirs)
        mods = check_modalities(cls.name, modalities, list(dirs) or cls.available)
        base = find_base(root, cls.candidates, cls.splits[0], cls.folder,
                         f"extract {cls.folder} so that {os.path.join(cls.candidates[0], cls.splits[0])}/ exists")
        train, query, gallery = (cls._read(base, split, mods, dirs) for split in cls.splits)
        if modality_captions:  # train from train_*.json, query and gallery from test_*.json
            text_dir = os.path.join(base, "text")
            tags = {m: d for m, d in dirs.items() if m not in CAPTION_TAGS}
            train = attach_captions(train, text_dir, "train", mods, tags, missing_caption)
            query = attach_captions(query, text_dir, "test", mods, tags, missing_caption)
            gallery = attach_captions(gallery, text_dir, "test", mods, tags, missing_caption)
        train = relabel(train)
        for ss in (train, query, gallery):
            check_readable(ss)
        num_cams = max(s.camid for s in train + query + gallery) + 1
        return ReIDData(train, query, gallery, mods, num_cams, name=cls.name, protocol=cls.protocol)

    @classmethod
    def _read(cls, base: str, split: str, mods: List[str], dirs: Dict[str, str]) -> List[Sample]:
        raise NotImplementedError


@DATASETS.register("rgbnt100")
class RGBNT100(SplitFolders):
    """RGBNT100 (vehicles): ``RGBNT100/rgbir/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>_*.jpg``.

    Each jpg holds RGB | NI | TI side by side (three equal-width strips, 256 px each in the
    release); camera = the number after ``c`` minus 1, pid -1 (junk) dropped, training pids
    relabelled — as TOP-ReID / MambaPro read it.
    """

    name, folder = "rgbnt100", "RGBNT100"
    candidates = (os.path.join("RGBNT100", "rgbir"), "rgbir", "")
    strips = {"rgb": 0, "nir": 1, "tir": 2}
    available = tuple(strips)
    pattern = re.compile(r"([-\d]+)_c(\d+)")

    @classmethod
    def _read(cls, base: str, split: str, mods: List[str], dirs: Dict[str, str]) -> List[Sample]:
        samples = [Sample({x: path for x in mods}, pid, cam - 1,
                          crops={x: (cls.strips[x], len(cls.strips)) for x in mods})
                   for path, pid, cam in market_files(base, split, cls.pattern, "RGBNT100/rgbir", "<pid>_c<cam>_*.jpg")]
        return samples


@DATASETS.register("msvr310")
class MSVR310(SplitFolders):
    """MSVR310 (vehicles): ``MSVR310/{bounding_box_train,query3,bounding_box_test}/<vid>/{vis,ni,th}/<img>``.

    The three modalities are paired by identical name; vid = ``img[0:4]``, scene = ``img[6:9]``,
    camera = ``img[11]`` (as TOP-ReID / MambaPro parse it). The lowercase ``msvr310/`` folder is
    accepted too. Its papers evaluate with ``eval.protocol: msvr310`` (same pid *and scene*
    removed per query).
    """

    name, folder, protocol = "msvr310", "MSVR310", "msvr310"
    candidates = ("MSVR310", "msvr310")
    splits = ("bounding_box_train", "query3", "bounding_box_test")
    modality_dirs = {"rgb": "vis", "nir": "ni", "tir": "th"}
    extensible_modalities = True  # data.modality_dirs adds folders
    available = tuple(modality_dirs)

    @staticmethod
    def parse_name(name: str) -> Tuple[int, int, int]:
        """``0001_s001_v3_...jpg`` -> (vid 1, scene 1, camera 3)."""
        return int(name[0:4]), int(name[6:9]), int(name[11])

    @classmethod
    def _read(cls, base: str, split: str, mods: List[str], dirs: Dict[str, str]) -> List[Sample]:
        d = os.path.join(base, split)
        if not os.path.isdir(d):
            raise DataError(f"{d} is missing; MSVR310 has {', '.join(cls.splits)}")
        samples = []
        for vid in sorted(os.listdir(d)):
            vdir = os.path.join(d, vid)
            if not os.path.isdir(vdir):
                continue
            mdirs = {m: os.path.join(vdir, dirs[m]) for m in mods}
            for name in paired_names(mdirs, "MSVR310", split):
                try:
                    pid, scene, cam = cls.parse_name(name)
                except ValueError:
                    raise DataError(f"cannot parse vid/scene/camera from {os.path.join(mdirs[mods[0]], name)}: "
                                    "expected <vid:4>_s<scene:3>_v<cam>_*.jpg") from None
                samples.append(Sample({m: os.path.join(x, name) for m, x in mdirs.items()}, pid, cam, sceneid=scene))
        if not samples:
            raise DataError(f"{d} has no <vid>/ folders with images: the {split!r} split is empty")
        return samples


@DATASETS.register("orbench")
class ORBench:
    """ORBench (persons; RGB, NIR, colour pencil, sketch, text): ``ORBench/{vis,nir,cp,sk}/<id>/*.jpg``,
    ``train_annos.json`` and ``test_gallery_and_queries.json``.

    Training: every ``train_annos.json`` entry (``{"id", "file_path": "vis/<id>/x.jpg", "caption"}``)
    is an RGB image with its caption; the other image modalities are not paired with it and are
    drawn, for every training sample, from the same identity's folder (``Sample.pools``). Test: the
    RGB gallery (``RGB_GALLERY``: ``[pid, path]``) and one query set per other key: the benchmark has
    32 *ordered* sets (``NIR``, ..., ``CP+NIR`` and ``NIR+CP`` as two tasks, ..., 4 quadruples; see
    :data:`hybrid_reid.data.synth.ORBENCH_QUERY_SETS`), named here by their canonical modalities in
    the key's order (``cpencil+nir``). An entry is read by position: ``[pid, one item per modality
    of the key, in its order]`` (an image path under that modality's folder, or the caption for
    ``TEXT``). A set whose modalities are not all in ``data.modalities`` is left out. There are no
    cameras: the ``orbench`` protocol filters none.
    """

    candidates = ("ORBench", "orbench", "")
    modality_dirs = {"rgb": "vis", "nir": "nir", "cpencil": "cp", "sketch": "sk"}
    train_file, test_file, gallery_key = "train_annos.json", "test_gallery_and_queries.json", "RGB_GALLERY"

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities)

    @classmethod
    def load(cls, root: str, modalities: Sequence[str]) -> ReIDData:
        mods = check_modalities("orbench", modalities, [*cls.modality_dirs, TEXT])
        if "rgb" not in mods:
            raise DataError(f"data.modalities={mods}: ORBench's gallery and training anchors are RGB; include rgb")
        base = find_base(root, cls.candidates, cls.train_file, "ORBench",
                         f"extract ORBench so that ORBench/{cls.train_file} exists")
        train = relabel(cls._read_train(base, mods))
        gallery, query_sets = cls._read_test(base, mods)
        check_readable(train)
        check_readable(gallery)
        for q in query_sets.values():
            check_readable(q)
        first = next(iter(query_sets.values()))
        return ReIDData(train, first, gallery, mods, num_cams=1, query_sets=query_sets, name="orbench",
                        protocol="orbench")

    @classmethod
    def _json(cls, path: str):
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing; ORBench ships it beside vis/, nir/, cp/ and sk/")
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None

    @classmethod
    def _read_train(cls, base: str, mods: List[str]) -> List[Sample]:
        path = os.path.join(base, cls.train_file)
        annos = cls._json(path)
        if not isinstance(annos, list) or not annos:
            raise DataError(f"{path}: expected a non-empty list of {{\"id\", \"file_path\", \"caption\"}}")
        pools: Dict[Tuple[str, str], Tuple[str, ...]] = {}
        samples = []
        for i, a in enumerate(annos):
            try:
                pid, rel = int(a["id"]), str(a["file_path"])
                text = str(a["caption"]) if TEXT in mods else None
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}: entry {i} needs id, file_path and caption; got {a!r}") from None
            folder = os.path.basename(os.path.dirname(rel))
            paths, sample_pools = {"rgb": os.path.join(base, rel)}, {}
            for m in mods:
                if m == "rgb" or is_text(m):
                    continue
                key = (m, folder)
                if key not in pools:
                    d = os.path.join(base, cls.modality_dirs[m], folder)
                    files = list_images(d) if os.path.isdir(d) else []
                    if not files:
                        raise DataError(f"{d} has no images; identity {folder} ({rel}) needs {m!r} images "
                                        f"(or drop {m!r} from data.modalities)")
                    pools[key] = tuple(os.path.join(d, f) for f in files)
                sample_pools[m] = pools[key]
                paths[m] = pools[key][0]
            samples.append(Sample(paths, pid, 0, text=text, pools=sample_pools or None))
        return samples

    @classmethod
    def _read_test(cls, base: str, mods: List[str]) -> Tuple[List[Sample], Dict[str, List[Sample]]]:
        path = os.path.join(base, cls.test_file)
        spec = cls._json(path)
        if not isinstance(spec, dict) or cls.gallery_key not in spec:
            raise DataError(f"{path}: expected an object with {cls.gallery_key!r} and query sets such as 'NIR', "
                            "'CP+SK'")
        gallery = [cls._entry(path, cls.gallery_key, e, base, ["rgb"]) for e in spec[cls.gallery_key]]
        query_sets: Dict[str, List[Sample]] = {}
        for key, entries in spec.items():
            if key == cls.gallery_key:
                continue
            try:
                qmods = [canonical_modality(k.strip()) for k in key.split("+")]
            except ValueError as e:
                raise DataError(f"{path}: query set {key!r}: {e}") from None
            if any(m not in mods for m in qmods):
                logger.info("orbench: query set %s left out (data.modalities=%s)", key, mods)
                continue
            query_sets["+".join(qmods)] = [cls._entry(path, key, e, base, qmods) for e in entries]
        if not gallery or not query_sets:
            raise DataError(f"{path}: no gallery or no query set for data.modalities={mods}")
        return gallery, query_sets

    @classmethod
    def _entry(cls, path: str, key: str, entry, base: str, qmods: List[str]) -> Sample:
        """``[pid, item per modality of the key, in the key's order]`` -> a Sample with exactly
        ``qmods``, read by position as the benchmark defines it: an image item must lie in its
        modality's folder, a ``TEXT`` item is the caption, and anything more or less is an error."""
        bad = f"{path}: {key} entry {entry!r} does not hold a pid and exactly {qmods}"
        if not isinstance(entry, list) or len(entry) != 1 + len(qmods) or isinstance(entry[0], bool) \
                or not isinstance(entry[0], int):
            raise DataError(f"{bad} (expected [pid, {', '.join(qmods)}])")
        paths, text = {}, None
        for m, x in zip(qmods, entry[1:]):
            if not isinstance(x, str):
                raise DataError(f"{bad}: the {m} item {x!r} is not a string")
            if is_text(m):
                text = x
                continue
            folder = x.replace("\\", "/").split("/")[0]
            if folder != cls.modality_dirs[m]:
                raise DataError(f"{bad}: the {m} item {x} is not under {cls.modality_dirs[m]}/")
            paths[m] = os.path.join(base, x)
        return Sample(paths, entry[0], 0, text=text)


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
        return ReIDData(train=train, query=query, gallery=gallery, modalities=["rgb"], num_cams=num_cams,
                        name="market1501")

    @classmethod
    def _read(cls, base: str, split: str) -> List[Sample]:
        return [Sample({"rgb": path}, pid, cam - 1)
                for path, pid, cam in market_files(base, split, cls.pattern, "Market-1501", "<pid>_c<cam>s*.jpg")]


def rgb_only(name: str, modalities_: Sequence[str]) -> List[str]:
    """``data.modalities`` of a single-modality (RGB) data set: ``[rgb]`` (or an alias), else an error."""
    mods = [canonical_modality(m) for m in modalities_]
    if mods != ["rgb"]:
        raise DataError(f"{name} has only the rgb modality; set data.modalities=[rgb] (got {mods})")
    return mods


@DATASETS.register("msmt17")
class MSMT17:
    """MSMT17 as released: ``MSMT17_V1/{train,test}/<pid:04d>/<name>.jpg`` and ``list_train.txt``,
    ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` (``MSMT17_V2``: the images in
    ``mask_train_v2/`` and ``mask_test_v2/``). RGB only.

    A list line is ``<path under train/ or test/> <pid>`` (``0000/0000_000_01_0303morning_0015_0.jpg
    0``); the camera is the name's third ``_`` field minus 1 (``01`` -> 0; 15 cameras), the pid is the
    listed one (training pids relabelled), as torchreid and fast-reid read it. **Training uses
    list_train + list_val** (32,621 images of 1,041 identities), as TransReID and CLIP-ReID train on
    MSMT17; torchreid and fast-reid add list_val only with ``combineall``. query / gallery: the two
    test lists. ``data.root`` is the folder that holds ``MSMT17_V1/`` (or ``MSMT17_V2/``,
    ``msmt17/MSMT17_V1/``, ``MSMT17/``), or that folder itself. Every malformed list line and
    every listed image that is missing is reported at once, with its line number.
    """

    candidates = ("MSMT17_V1", "MSMT17_V2", os.path.join("msmt17", "MSMT17_V1"), os.path.join("msmt17", "MSMT17_V2"),
                  "MSMT17", "msmt17", "")
    image_dirs = {"train": ("train", "mask_train_v2"), "test": ("test", "mask_test_v2")}
    lists = {"train": ("train", ("list_train.txt", "list_val.txt")), "query": ("test", ("list_query.txt",)),
             "gallery": ("test", ("list_gallery.txt",))}

    @classmethod
    def from_config(cls, cfg) -> ReIDData:
        return cls.load(cfg.root, cfg.modalities)

    @classmethod
    def load(cls, root: str, modalities: Sequence[str]) -> ReIDData:
        mods = rgb_only("msmt17", modalities)
        base = find_base(root, cls.candidates, "list_train.txt", "MSMT17",
                         "extract MSMT17_V1.tar.gz (or V2) there, so that MSMT17_V1/list_train.txt exists")
        dirs = {}
        for part, names in cls.image_dirs.items():
            d = next((os.path.join(base, n) for n in names if os.path.isdir(os.path.join(base, n))), None)
            if d is None:
                raise DataError(f"{base} has no {' or '.join(names)}/ folder: the {part} images of MSMT17 are missing")
            dirs[part] = d
        splits = {}
        for split, (part, files) in cls.lists.items():
            splits[split] = [s for f in files for s in cls._read_list(os.path.join(base, f), dirs[part])]
        train, query, gallery = relabel(splits["train"]), splits["query"], splits["gallery"]
        for ss in (train, query, gallery):
            check_readable(ss)
        num_cams = max(s.camid for s in train + query + gallery) + 1
        return ReIDData(train, query, gallery, mods, num_cams, name="msmt17")

    @staticmethod
    def _read_list(path: str, image_dir: str) -> List[Sample]:
        """The samples of one list file; every bad line is reported at once."""
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing; MSMT17 ships list_train.txt, list_val.txt, list_query.txt and "
                            "list_gallery.txt beside train/ and test/")
        problems = Problems(path, "each line is '<pid:04d>/<name>.jpg <pid>', the camera the name's third _ field")
        samples = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    rel, pid = parts[0], int(parts[1])
                    cam = int(os.path.basename(rel).split("_")[2]) - 1
                    if len(parts) != 2 or cam < 0:
                        raise ValueError
                except (ValueError, IndexError):
                    problems.add(f"cannot read {line.strip()!r}", n)
                    continue
                image = os.path.join(image_dir, rel)
                if not os.path.isfile(image):
                    problems.add(f"{image} does not exist", n)
                    continue
                samples.append(Sample({"rgb": image}, pid, cam))
        problems.raise_if_any()
        if not samples:
            raise DataError(f"{path} lists no images")
        return samples


@DATASETS.register("veri776")
class VeRi776(SplitFolders):
    """VeRi-776 (vehicles): ``VeRi/{image_train,image_query,image_test}/<vid:04d>_c<cam:03d>_<frame>_<n>.jpg``.

    RGB only; camera = the number after ``c`` minus 1 (20 cameras), training ids relabelled, as
    torchreid, fast-reid and TransReID read it (``veri/`` and ``VeRi-776/`` are accepted too). Its
    standard protocol is the ``market`` one: gallery images of the query's vehicle taken by the
    query's camera are removed.
    """

    name, folder = "veri776", "VeRi"
    candidates = ("VeRi", "veri", "VeRi-776", "")
    splits = ("image_train", "image_query", "image_test")
    available = ("rgb",)
    pattern = re.compile(r"([-\d]+)_c(\d+)")

    @classmethod
    def load(cls, root: str, modalities: Sequence[str], modality_dirs: Optional[Dict[str, str]] = None
             ) -> ReIDData:
        return super().load(root, rgb_only(cls.name, modalities), modality_dirs)

    @classmethod
    def _read(cls, base: str, split: str, mods: List[str], dirs: Dict[str, str]) -> List[Sample]:
        if not os.path.isdir(os.path.join(base, split)):
            raise DataError(f"{os.path.join(base, split)} is missing; VeRi has {', '.join(cls.splits)}")
        return [Sample({"rgb": path}, pid, cam - 1)
                for path, pid, cam in market_files(base, split, cls.pattern, "VeRi", "<vid>_c<cam>_*.jpg")]


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
        return cls.load(cfg.root, cfg.modalities, cfg.synth, getattr(cfg, "modality_dirs", None),
                        **caption_options(cfg))

    @classmethod
    def load(cls, root: Optional[str], modalities: Sequence[str], spec=None,
             modality_dirs: Optional[Dict[str, str]] = None, modality_captions: bool = False,
             missing_caption: str = "error") -> ReIDData:
        from .synth import SynthSpec, ensure_generated

        spec = spec or SynthSpec()
        if root is None:
            tag = f"ids{spec.ids}-cams{spec.cams}-k{spec.images_per_cam}-t{spec.test_fraction}-" \
                  f"s{spec.seed}-{spec.size[0]}x{spec.size[1]}"
            root = os.path.join(default_cache_dir(), "synthetic", tag)
        ensure_generated(root, spec)
        return super().load(root, modalities, modality_dirs, modality_captions, missing_caption)


#: ``data.*`` keys only some data sets read (their ``config_keys``), with the value that means "not set"
OWN_KEYS = {"manifest": None, "camera_pattern": DEFAULT_CAMERA_PATTERN}


def load_data(cfg) -> ReIDData:
    """The data set the ``data`` config section names, checked (see :class:`DataError`)."""
    try:
        cls = DATASETS.get(cfg.name)
    except KeyError as e:
        raise DataError(f"data.name: {e.args[0]}") from None
    if getattr(cfg, "modality_dirs", None) and not getattr(cls, "extensible_modalities", False):
        raise DataError(f"data.modality_dirs: {cfg.name} does not keep its modalities in folders; it cannot take "
                        f"{sorted(cfg.modality_dirs)}")
    for key, default in OWN_KEYS.items():  # a key another data set reads would be ignored here: say so
        value = getattr(cfg, key, default)
        if value != default and key not in getattr(cls, "config_keys", ()):
            owners = [n for n in DATASETS.names() if key in getattr(DATASETS.get(n), "config_keys", ())]
            raise DataError(f"data.{key}={value!r} is read only by data.name={' / '.join(owners)}; {cfg.name} "
                            f"ignores it: remove it (or set data.name)")
    if getattr(cfg, "modality_captions", False) and not getattr(cls, "has_modality_captions", False):
        raise DataError(f"data.modality_captions: {cfg.name} has no per-modality caption files (rgbnt201, rgbnt100, "
                        "msvr310 and synthetic have, in <DATASET>/text/)")
    return cls.from_config(cfg)
