"""An embedded synthetic multi-modal ReID data set in the RGBNT201 layout (``run.py synth``).

Every identity is a combination of three independent codes, each visible in one modality only:

* **RGB**: the colour of the upper body (4 hues) and the lightness of the lower body (2 levels);
  8 codes. In NIR and TIR clothes have no colour.
* **NIR**: a fabric texture (stripe orientation x period) on the clothes; 6 codes. Invisible in
  RGB (dyed fabric looks flat) and in TIR.
* **TIR**: where the body is warm (head, chest, left/right side, legs, hands); 6 codes.

so a single modality confuses identities that share its code (with 30 test identities, each RGB
code is shared by about four of them) while all three together separate them. Each identity also
has a slightly different build (height, width). Cameras change the light level, tint, background
and framing (scale and offset of the person box); every image adds pose jitter and sensor noise.
The three images of one sample share the geometry and are written under the same file name, as in
RGBNT201.

Layout written (``<pid:06d>_cam<c>_<k:02d>.jpg``, cameras numbered from 1):

    OUT/RGBNT201/{train_171,test}/{RGB,NI,TI}/000001_cam1_00.jpg
    OUT/RGBNT201/synth.json       # the generator's parameters
    OUT/RGBNT201/captions.json    # {"000001": "a person in a red top and dark trousers with ..."}
    OUT/RGBNT201/text/{train,test}_{RGB,NI,TI}.json   # [{"item": "000001_cam1_00.jpg", "description": ...}]

Captions (the ``text`` modality) describe what a witness sees: the top's colour, the trousers'
lightness and the fabric's stripes; never the heat pattern.

Per-modality captions (``text/``, the layout of IDEA's QwenVL annotations, ``data.modality_captions``;
also written for the ``rgbnt100`` and ``msvr310`` layouts) describe each image in its own modality,
as a captioning model would: the RGB one the clothes' colours, the NIR one the fabric's stripes, the
TIR one the warmest body part. Like a real captioner's they are not always right: per image and
modality the identity's words are used with probability 0.7, a vague sentence without them 0.2, and
another identity's words 0.1 (drawn from their own generator, so the images do not change).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

HUES = np.array([[0.85, 0.15, 0.12], [0.15, 0.7, 0.2], [0.15, 0.3, 0.9], [0.9, 0.8, 0.1]])  # upper body
LOWER = np.array([0.18, 0.72])  # lower-body lightness
STRIPES = [(angle, period) for angle in (0.0, np.pi / 2, np.pi / 4) for period in (5.0, 11.0)]  # NIR codes
HOT_SPOTS = [  # TIR codes: (u, v) centres in the canonical body frame
    [(0.0, 0.08)], [(0.0, 0.33)], [(-0.28, 0.36)], [(0.28, 0.36)], [(-0.12, 0.78), (0.12, 0.78)],
    [(-0.36, 0.52), (0.36, 0.52)]]
N_RGB, N_NIR, N_TIR = len(HUES) * len(LOWER), len(STRIPES), len(HOT_SPOTS)
HUE_NAMES = ("red", "green", "blue", "yellow")
LOWER_NAMES = ("dark", "light")
STRIPE_NAMES = [f"{'fine' if period < 8 else 'wide'} {direction} stripes"
                for direction in ("horizontal", "vertical", "diagonal") for period in (5.0, 11.0)]
GENERATOR_VERSION = 3  # bump when the output changes, so cached sets are regenerated (3: per-modality captions)


def caption(codes) -> str:
    """What a witness would say: the clothes' colours and texture (never the heat pattern)."""
    rgb, nir = int(codes[0]), int(codes[1])
    return (f"a person in a {HUE_NAMES[rgb // len(LOWER)]} top and {LOWER_NAMES[rgb % len(LOWER)]} trousers "
            f"with {STRIPE_NAMES[nir]}")
HOT_SPOT_NAMES = ("head", "chest", "left side", "right side", "legs", "hands")
CAPTION_PROBS = (0.7, 0.2, 0.1)  # per-modality captions: the identity's words, a vague sentence, wrong words


def modality_caption(codes, modality: int, rng: np.random.Generator) -> str:
    """One image's caption in one modality (0 RGB, 1 NIR, 2 TIR): usually the identity's code in words,
    sometimes vague, sometimes wrong (see the module docstring)."""
    kind = rng.choice(3, p=CAPTION_PROBS)
    n = (N_RGB, N_NIR, N_TIR)[modality]
    code = int(codes[modality]) if kind == 0 else (int(codes[modality]) + int(rng.integers(1, n))) % n
    if modality == 0:
        if kind == 1:
            return "The person is wearing a top and trousers."
        return (f"The person is wearing a {HUE_NAMES[code // len(LOWER)]} top and "
                f"{LOWER_NAMES[code % len(LOWER)]} trousers.")
    if modality == 1:
        return "The clothes look bright." if kind == 1 else f"The clothes show {STRIPE_NAMES[code]}."
    return "The body looks warm." if kind == 1 else f"The {HOT_SPOT_NAMES[code]} is the warmest part of the body."


MODALITY_DIRS = ("RGB", "NI", "TI")
CAPTION_FILE_TAGS = ("RGB", "NI", "TI")
CAPTION_DIRS = {"rgbnt201": "text", "rgbnt100": os.path.join("rgbir", "text"), "msvr310": "text"}


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of the generated set (recorded in ``synth.json``)."""

    ids: int = 100
    cams: int = 4
    images_per_cam: int = 3
    test_fraction: float = 0.3
    seed: int = 0
    size: Tuple[int, int] = (128, 64)

    def __post_init__(self) -> None:
        if self.ids < 4:
            raise ValueError(f"synthetic data needs at least 4 identities, got ids={self.ids}")
        if not 2 <= self.cams <= 9:
            raise ValueError(f"cams must be in 2..9 (RGBNT201 names hold one camera digit), got {self.cams}")
        if self.images_per_cam < 1:
            raise ValueError(f"images_per_cam must be >= 1, got {self.images_per_cam}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if min(self.size) < 16:
            raise ValueError(f"size must be at least 16x16, got {self.size}")

    @property
    def num_test(self) -> int:
        return max(2, min(self.ids - 2, round(self.ids * self.test_fraction)))


def _identity_codes(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """[ids, 3] (rgb, nir, tir) codes; distinct combinations while there are enough."""
    total = N_RGB * N_NIR * N_TIR
    flat = rng.choice(total, size=spec.ids, replace=spec.ids > total)
    return np.stack([flat // (N_NIR * N_TIR), (flat // N_TIR) % N_NIR, flat % N_TIR], 1)


def _render(codes, build, cam, jitter, size, rng, drawings: bool = False) -> Tuple[np.ndarray, ...]:
    """One sample's RGB, NIR and TIR images (and with ``drawings`` its colour-pencil drawing and
    sketch), uint8 [H, W, 3] each, sharing the geometry."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = h * cam["scale"] * build[0] * (1 + jitter[0])
    cx = w * (0.5 + cam["dx"] + jitter[1])
    top = h * (cam["dy"] + jitter[2])
    u = (xx - cx) / (scale * 0.42 * build[1])   # canonical body frame: u across, v down (0 = head top)
    v = (yy - top) / scale
    head = (u / 0.45) ** 2 + ((v - 0.08) / 0.08) ** 2 <= 1
    upper = (np.abs(u) <= 0.42) & (v > 0.16) & (v <= 0.52)
    arms = (np.abs(u) > 0.42) & (np.abs(u) <= 0.55) & (v > 0.18) & (v <= 0.5)
    lower = (np.abs(u) <= 0.36) & (np.abs(u) >= 0.03) & (v > 0.52) & (v <= 1.0)
    body = head | upper | arms | lower
    clothes = upper | lower
    noise = lambda s: rng.normal(0, s, (h, w)).astype(np.float32)  # noqa: E731

    # RGB: coloured clothes, skin, a per-camera background; light level and tint per camera
    bg = cam["bg"][None, None, :] * (0.8 + 0.2 * np.sin(xx / 5.0 + cam["phase"]) * np.cos(yy / 7.0))[..., None]
    rgb = bg.copy()
    rgb[head | arms] = np.array([0.85, 0.65, 0.5])
    rgb[upper] = HUES[codes[0] // len(LOWER)]
    rgb[lower] = LOWER[codes[0] % len(LOWER)]
    rgb = rgb * cam["gain"] * cam["tint"][None, None, :] + noise(0.04)[..., None]

    # NIR: clothes show a stripe texture (the NIR code), no colour
    angle, period = STRIPES[codes[1]]
    proj = (xx - cx) * np.cos(angle) + (yy - top) * np.sin(angle)
    stripes = 0.5 + 0.3 * np.sign(np.sin(2 * np.pi * proj / (period * h / 128)))
    nir = 0.25 + 0.1 * cam["bg"].mean() + noise(0.03)
    nir = np.where(body, 0.55, nir)
    nir = np.where(clothes, stripes, nir)
    nir = nir * cam["nir_gain"] + noise(0.04)

    # TIR: ambient background, a warm body and hot spots (the TIR code)
    heat = np.zeros((h, w), np.float32)
    for hu, hv in HOT_SPOTS[codes[2]]:
        heat += np.exp(-((u - hu) ** 2 / 0.03 + (v - hv) ** 2 / 0.006))
    tir = np.where(body, 0.45 + 0.5 * np.clip(heat, 0, 1), cam["ambient"]) + noise(0.04)

    def to_u8(img: np.ndarray) -> np.ndarray:
        img = np.clip(img, 0, 1) * 255
        return (img if img.ndim == 3 else np.repeat(img[..., None], 3, 2)).astype(np.uint8)

    if not drawings:
        return to_u8(rgb), to_u8(nir), to_u8(tir)
    # drawings (ORBench's cp / sk): white paper, no camera light; outlines of every body part
    edge = np.zeros((h, w), bool)
    for part in (head, upper, arms, lower):
        edge |= part & ~(np.roll(part, 1, 0) & np.roll(part, -1, 0) & np.roll(part, 1, 1) & np.roll(part, -1, 1))
    # colour pencil: the clothes' colours (the RGB code) in diagonal hatching
    hatch = 0.7 + 0.3 * (np.sin((xx + yy) * 1.3) > 0)
    cp = np.full((h, w, 3), 0.95, np.float32) + noise(0.02)[..., None]
    cp[head | arms] = np.array([0.93, 0.78, 0.66])
    cp[upper] = 1 - (1 - HUES[codes[0] // len(LOWER)]) * hatch[upper][:, None]
    cp[lower] = 1 - (1 - LOWER[codes[0] % len(LOWER)]) * hatch[lower][:, None]
    cp[edge] = 0.2
    # sketch: outlines and the fabric's stripes (the NIR code) as pencil lines, no colour
    lines = np.abs(np.sin(np.pi * proj / (period * h / 128))) < 0.3
    sk = 0.96 + noise(0.02)
    sk = np.where(clothes & lines, 0.35, sk)
    sk = np.where(edge, 0.1, sk)
    return to_u8(rgb), to_u8(nir), to_u8(tir), to_u8(cp), to_u8(sk)


LAYOUTS = {"rgbnt201": "RGBNT201", "market1501": "Market-1501-v15.09.15", "rgbnt100": "RGBNT100",
           "msvr310": "MSVR310", "orbench": "ORBench", "msmt17": "MSMT17_V1", "veri776": "VeRi",
           "folder": "folder", "manifest": "manifest"}
# The 32 ordered query sets of ORBench's test_gallery_and_queries.json, as the benchmark defines them
# (read off the ReID5o authors' reader): 4 single, 12 ordered pairs, 12 ordered triples, 4 quadruples.
# An entry is [pid, one item per modality of the key, in the key's order]; TEXT is the caption.
ORBENCH_QUERY_SETS = (
    "NIR", "CP", "SK", "TEXT",
    "TEXT+NIR", "NIR+TEXT", "TEXT+SK", "SK+TEXT", "TEXT+CP", "CP+TEXT",
    "SK+CP", "CP+SK", "SK+NIR", "NIR+SK", "CP+NIR", "NIR+CP",
    "TEXT+CP+SK", "CP+SK+TEXT", "SK+CP+TEXT", "CP+NIR+TEXT", "NIR+CP+TEXT", "TEXT+NIR+CP",
    "SK+NIR+TEXT", "NIR+SK+TEXT", "TEXT+NIR+SK", "CP+NIR+SK", "NIR+CP+SK", "SK+NIR+CP",
    "TEXT+NIR+CP+SK", "SK+NIR+CP+TEXT", "CP+NIR+SK+TEXT", "NIR+CP+SK+TEXT",
)


def generate(out: str, spec: SynthSpec = SynthSpec(), overwrite: bool = False, layout: str = "rgbnt201") -> str:
    """Write the synthetic set to ``out/<folder>`` (atomically: a temp folder, then a rename).

    Args:
        out: the folder that will contain the data set's folder (what ``data.root`` points to).
        spec: the generator's parameters.
        overwrite: replace an existing set.
        layout: the release whose layout is written (see :data:`LAYOUTS`):

            * ``rgbnt201``: ``RGBNT201/``, RGB + NIR + TIR, captions;
            * ``market1501``: ``Market-1501-v15.09.15/``, RGB only: the first image of every test
              identity and camera is a query, the rest gallery, plus junk (pid -1) and distractor
              (pid 0) images;
            * ``rgbnt100``: ``RGBNT100/rgbir/``, RGB | NI | TI side by side in one jpg, queries
              as for market1501;
            * ``msvr310``: ``MSVR310/<split>/<vid>/{vis,ni,th}/``; capture ``k`` of every camera is
              scene ``k + 1``; the first capture of camera 0 is each test identity's query
              (``query3``), everything else the gallery, so the same-scene rule matters;
            * ``msmt17``: ``MSMT17_V1/{train,test}/<pid:04d>/<pid:04d>_<n:03d>_<cam:02d>_0303morning_<k:04d>_0.jpg``,
              RGB only, training and test identities numbered from 0 each (as released), and
              ``list_{train,val,query,gallery}.txt`` (``<pid:04d>/<name> <pid>``): the first capture
              of camera 1 of every training identity is in list_val, the first of every test
              identity and camera in list_query;
            * ``veri776``: ``VeRi/{image_train,image_query,image_test}/<vid:04d>_c<cam:03d>_<k:08d>_0.jpg``,
              RGB only, queries as for market1501;
            * ``folder``: ``folder/{train,query,gallery}/{rgb,nir,tir}/<pid:04d>/<pid:04d>_c<cam>_<k:02d>.jpg``
              (the ``folder`` data set: ``data.root`` = ``OUT/folder``), queries as for market1501;
            * ``manifest``: ``manifest/images/{rgb,nir,tir}/<pid:04d>_c<cam>_<k:02d>.jpg`` and
              ``manifest/manifest.csv`` (``split,pid,camera,rgb,nir,tir,text``; paths relative to
              it, cameras numbered from 1, the caption in ``text``), queries as for market1501;
            * ``orbench``: ``ORBench/{vis,nir,cp,sk}/<id:04d>/`` with colour-pencil drawings (the
              RGB code) and sketches (the NIR code), in the benchmark's structure: training
              identities numbered 1..N (``train_annos.json`` with captions; the ReID5o reader
              requires it), test identities after them, and ``test_gallery_and_queries.json``
              with the RGB gallery and the benchmark's 32 ordered query sets
              (:data:`ORBENCH_QUERY_SETS`, entries ``[pid, item per modality in the key's order]``),
              two queries per test identity.

    Returns:
        The path of the written folder.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown synthetic layout {layout!r}; choose from {sorted(LAYOUTS)}")
    folder = LAYOUTS[layout]
    target = os.path.join(out, folder)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --force (overwrite=True) to replace it")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    codes = _identity_codes(spec, rng)
    builds = np.stack([rng.uniform(0.92, 1.06, spec.ids), rng.uniform(0.85, 1.15, spec.ids)], 1)
    cams = [dict(gain=rng.uniform(0.55, 1.25), tint=rng.uniform(0.78, 1.22, 3), bg=rng.uniform(0.15, 0.75, 3),
                 phase=rng.uniform(0, 6.3), nir_gain=rng.uniform(0.7, 1.2), ambient=rng.uniform(0.05, 0.35),
                 scale=rng.uniform(0.78, 0.95), dx=rng.uniform(-0.08, 0.08), dy=rng.uniform(0.01, 0.08))
            for _ in range(spec.cams)]
    test_ids = set(rng.choice(spec.ids, size=spec.num_test, replace=False).tolist())
    # ORBench numbers identities 1..N in training, the test identities after them; others pid + 1
    order = sorted(range(spec.ids), key=lambda p: (p in test_ids, p)) if layout == "orbench" else range(spec.ids)
    number = {pid: i + 1 for i, pid in enumerate(order)}
    if layout == "msmt17":  # MSMT17 numbers its training and its test identities from 0 each
        for ids in (sorted(set(range(spec.ids)) - test_ids), sorted(test_ids)):
            number.update({pid: i for i, pid in enumerate(ids)})
    tmp = tempfile.mkdtemp(dir=out, prefix=f".tmp-{folder}-")
    caption_rng = np.random.default_rng([spec.seed, 1])  # its own stream: the images stay as they were
    modality_captions: dict = {(split, tag): [] for split in ("train", "test") for tag in CAPTION_FILE_TAGS}
    try:
        for pid in range(spec.ids):
            for c in range(spec.cams):
                for k in range(spec.images_per_cam):
                    jitter = rng.uniform([-0.05, -0.05, -0.03], [0.05, 0.05, 0.03])
                    images = _render(codes[pid], builds[pid], cams[c], jitter, spec.size, rng,
                                     drawings=layout == "orbench")
                    files = _layout_files(layout, pid, c, k, pid in test_ids, images, number[pid])
                    for path, img in files:
                        os.makedirs(os.path.join(tmp, os.path.dirname(path)), exist_ok=True)
                        Image.fromarray(img).save(os.path.join(tmp, path), quality=92)
                    if layout in CAPTION_DIRS:
                        split = "test" if pid in test_ids else "train"
                        item = os.path.basename(files[0][0])
                        for i, tag in enumerate(CAPTION_FILE_TAGS):
                            modality_captions[(split, tag)].append(
                                {"item": item, "description": modality_caption(codes[pid], i, caption_rng)})
        if layout in CAPTION_DIRS:
            os.makedirs(os.path.join(tmp, CAPTION_DIRS[layout]))
            for (split, tag), entries in modality_captions.items():
                with open(os.path.join(tmp, CAPTION_DIRS[layout], f"{split}_{tag}.json"), "w") as f:
                    json.dump(entries, f, indent=0)
        if layout == "orbench":
            _orbench_annotations(tmp, spec, codes, test_ids, number)
        if layout in ("msmt17", "manifest"):
            _index_files(layout, tmp, spec, codes, test_ids, number)
        if layout == "market1501":  # what the real gallery also holds: junk (-1) and distractors (0)
            for j, pid in enumerate((-1, -1, 0, 0)):
                noise = rng.uniform(0, 255, (*spec.size, 3)).astype(np.uint8)
                name = f"{pid:04d}_c{j % spec.cams + 1}s1_{j:06d}_00.jpg" if pid >= 0 else \
                    f"-1_c{j % spec.cams + 1}s1_{j:06d}_00.jpg"
                os.makedirs(os.path.join(tmp, "bounding_box_test"), exist_ok=True)
                Image.fromarray(noise).save(os.path.join(tmp, "bounding_box_test", name), quality=92)
        meta = dict(asdict(spec), size=list(spec.size), version=GENERATOR_VERSION, codes=codes.tolist(),
                    test_ids=sorted(test_ids))
        with open(os.path.join(tmp, "synth.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(tmp, "captions.json"), "w") as f:
            json.dump({f"{pid + 1:06d}": caption(codes[pid]) for pid in range(spec.ids)}, f, indent=0)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote synthetic %s (%d identities, %d cameras) to %s", folder, spec.ids, spec.cams, target)
    return target


def _layout_files(layout: str, pid: int, cam: int, k: int, test: bool, images, number: int):
    """``(relative path, image)`` pairs one rendered sample becomes in ``layout`` (``number``: the
    identity's number in layouts that renumber, ORBench)."""
    market_split = ("query" if k == 0 else "bounding_box_test") if test else "bounding_box_train"
    if layout == "market1501":
        return [(os.path.join(market_split, f"{pid + 1:04d}_c{cam + 1}s1_{k:06d}_00.jpg"), images[0])]
    if layout == "rgbnt100":
        name = f"{pid + 1:04d}_c{cam + 1:03d}_{k:02d}.jpg"
        return [(os.path.join("rgbir", market_split, name), np.concatenate(images[:3], axis=1))]
    if layout == "msvr310":
        split = ("query3" if cam == 0 and k == 0 else "bounding_box_test") if test else "bounding_box_train"
        name = f"{pid + 1:04d}_s{k + 1:03d}_v{cam}_{k:03d}.jpg"
        return [(os.path.join(split, f"{pid + 1:04d}", d, name), img)
                for d, img in zip(("vis", "ni", "th"), images)]
    if layout == "msmt17":
        part = "test" if test else "train"
        name = f"{number:04d}_{cam * 100 + k:03d}_{cam + 1:02d}_0303morning_{k:04d}_0.jpg"
        return [(os.path.join(part, f"{number:04d}", name), images[0])]
    if layout == "veri776":
        split = ("image_query" if k == 0 else "image_test") if test else "image_train"
        return [(os.path.join(split, f"{pid + 1:04d}_c{cam + 1:03d}_{k:08d}_0.jpg"), images[0])]
    if layout in ("folder", "manifest"):
        split = ("query" if k == 0 else "gallery") if test else "train"
        name = f"{pid + 1:04d}_c{cam + 1}_{k:02d}.jpg"
        if layout == "manifest":
            return [(os.path.join("images", d, name), img) for d, img in zip(("rgb", "nir", "tir"), images)]
        return [(os.path.join(split, d, f"{pid + 1:04d}", name), img) for d, img in zip(("rgb", "nir", "tir"), images)]
    if layout == "orbench":
        name = f"{number:04d}_{cam}_{k:02d}.jpg"
        return [(os.path.join(d, f"{number:04d}", name), img)
                for d, img in zip(("vis", "nir", "cp", "sk"), (images[0], images[1], images[3], images[4]))]
    split = "test" if test else "train_171"
    name = f"{pid + 1:06d}_cam{cam + 1}_{k:02d}.jpg"
    return [(os.path.join(split, d, name), img) for d, img in zip(MODALITY_DIRS, images)]


def _index_files(layout: str, tmp: str, spec: SynthSpec, codes: np.ndarray, test_ids, number) -> None:
    """The files that index the images of ``layout`` in ``tmp``: MSMT17's four lists, or the manifest."""
    rows = []  # (split, pid, cam, k): every sample, in the order they were rendered
    for pid in range(spec.ids):
        for c in range(spec.cams):
            for k in range(spec.images_per_cam):
                test = pid in test_ids
                split = ("query" if k == 0 else "gallery") if test else ("val" if c == 0 and k == 0 else "train")
                rows.append((split, pid, c, k))
    if layout == "msmt17":
        for split in ("train", "val", "query", "gallery"):
            with open(os.path.join(tmp, f"list_{split}.txt"), "w") as f:
                for _, pid, c, k in (r for r in rows if r[0] == split):
                    path = _layout_files(layout, pid, c, k, pid in test_ids, [None], number[pid])[0][0]
                    f.write(f"{path.split(os.sep, 1)[1].replace(os.sep, '/')} {number[pid]}\n")
        return
    with open(os.path.join(tmp, "manifest.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "pid", "camera", "rgb", "nir", "tir", "text"])
        for split, pid, c, k in rows:
            name = f"{pid + 1:04d}_c{c + 1}_{k:02d}.jpg"
            writer.writerow(["train" if split == "val" else split, pid + 1, c + 1,
                             *[f"images/{d}/{name}" for d in ("rgb", "nir", "tir")], caption(codes[pid])])


def _orbench_annotations(tmp: str, spec: SynthSpec, codes: np.ndarray, test_ids, number) -> None:
    """ORBench's ``train_annos.json`` (ids 1..N) and ``test_gallery_and_queries.json`` (the RGB
    gallery and the 32 ordered query sets, entries by position) for the images in ``tmp``."""

    def files(d: str, pid: int):
        folder = f"{number[pid]:04d}"
        return [f"{d}/{folder}/{n}" for n in sorted(os.listdir(os.path.join(tmp, d, folder)))]

    train_ids = sorted((p for p in range(spec.ids) if p not in test_ids), key=number.get)
    test = sorted(test_ids, key=number.get)
    train = [{"id": number[pid], "file_path": f, "caption": caption(codes[pid])}
             for pid in train_ids for f in files("vis", pid)]
    spec_json = {"RGB_GALLERY": [[number[pid], f] for pid in test for f in files("vis", pid)]}
    dirs = {"NIR": "nir", "CP": "cp", "SK": "sk"}
    for key in ORBENCH_QUERY_SETS:
        entries = []
        for pid in test:
            for j in range(2):
                entry = [number[pid]]
                for i, m in enumerate(key.split("+")):
                    if m == "TEXT":
                        entry.append(caption(codes[pid]))
                    else:
                        fs = files(dirs[m], pid)
                        entry.append(fs[(j + i) % len(fs)])
                entries.append(entry)
        spec_json[key] = entries
    with open(os.path.join(tmp, "train_annos.json"), "w") as f:
        json.dump(train, f)
    with open(os.path.join(tmp, "test_gallery_and_queries.json"), "w") as f:
        json.dump(spec_json, f)


def ensure_generated(root: str, spec: SynthSpec) -> str:
    """Generate the set into ``root`` unless an identical one (same ``synth.json``) is already there."""
    meta_path = os.path.join(root, "RGBNT201", "synth.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        want = dict(asdict(spec), size=list(spec.size), version=GENERATOR_VERSION)
        if all(meta.get(k) == v for k, v in want.items()):
            return os.path.join(root, "RGBNT201")
        return generate(root, spec, overwrite=True)
    if os.path.exists(os.path.join(root, "RGBNT201")):
        raise FileExistsError(f"{root}/RGBNT201 exists but is not a synthetic set (no synth.json); "
                              "point data.root elsewhere or use data.name=rgbnt201")
    return generate(root, spec)
