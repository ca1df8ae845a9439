"""Paired image transforms: one geometry for all modalities of a sample, erasing per modality.

The peers' recipe (TransReID / TOP-ReID): resize (bicubic) -> horizontal flip -> pad + random crop
-> normalise -> random erasing (Zhong et al., timm's ``RandomErasing(mode="pixel", max_count=1)``).
Here the flip and the crop offset are drawn once per sample and applied to every modality, so the
RGB, NIR and TIR images stay aligned; random erasing is drawn per modality, as in the peers.

Every random decision comes from a :class:`SampleRNG` the caller passes in (the training loader
seeds one per sample from the run's seed, the epoch and the sample's position in the epoch's
global batch order), never from a process-wide generator: the same sample gets the same
augmentation whatever the number of loader workers or training processes.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor


class SampleRNG:
    """The random streams of one training sample: ``py`` (a :class:`random.Random`, for scalar
    draws) and ``torch`` (a :class:`torch.Generator`, for tensors), both seeded from ``key``.

    Args:
        key: integers that identify the draw, e.g. ``(seed, epoch, position)``; mixed with numpy's
            ``SeedSequence``, so nearby keys give unrelated streams.
    """

    def __init__(self, *key: int) -> None:
        a, b = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)
        self.py = random.Random(int(a))
        self.torch = torch.Generator().manual_seed(int(b) & ((1 << 63) - 1))


def random_erase(img: torch.Tensor, rng: SampleRNG, probability: float, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3) -> torch.Tensor:
    """Random erasing with per-pixel normal noise, in place on ``img`` [C, H, W]; returns it.

    The algorithm and the order of the draws are timm's ``RandomErasing(probability, mode="pixel",
    max_count=1)`` (the TransReID / TOP-ReID / MambaPro recipe): with ``probability``, up to 10
    attempts at a box of ``uniform(min_area, max_area)`` of the area and log-uniform aspect ratio in
    ``[min_aspect, 1/min_aspect]``; the first box that fits is filled with N(0, 1) noise. Here the
    draws come from ``rng`` instead of the global ``random`` / torch generators (tested equal to
    timm's when those are seeded alike).
    """
    if rng.py.random() > probability:
        return img
    chan, h_img, w_img = img.shape
    area = h_img * w_img
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = rng.py.uniform(min_area, max_area) * area
        aspect = math.exp(rng.py.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < w_img and h < h_img:
            top = rng.py.randint(0, h_img - h)
            left = rng.py.randint(0, w_img - w)
            img[:, top:top + h, left:left + w] = torch.empty((chan, h, w), dtype=img.dtype).normal_(
                generator=rng.torch)
            break
    return img


class PairedTransform:
    """Images keyed by modality -> normalised tensors ``[3, H, W]`` keyed by modality.

    Two stages, so that a data set can cache the first: :meth:`load` (PIL image -> resized uint8
    tensor, deterministic) and :meth:`__call__` (uint8 tensors -> augmented, normalised floats).

    Args:
        img_size: (H, W) network input.
        mean, std: the tower's normalisation (``model.encoder.mean`` / ``.std``).
        train: enable flip, pad-crop and random erasing.
        flip_prob, pad, erasing_prob: augmentation strengths (``data.flip_prob`` ...).
    """

    def __init__(self, img_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float], train: bool,
                 flip_prob: float = 0.5, pad: int = 10, erasing_prob: float = 0.5) -> None:
        self.size = (int(img_size[0]), int(img_size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.train = train
        self.flip_prob = flip_prob
        self.pad = pad
        self.erasing_prob = erasing_prob if train else 0.0

    def load(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 ``[3, H, W]`` at the network size (bicubic, as the peers' ``T.Resize``)."""
        h, w = self.size
        return pil_to_tensor(img.convert("RGB").resize((w, h), Image.BICUBIC))

    def __call__(self, images: Dict[str, torch.Tensor], rng: Optional[SampleRNG] = None) -> Dict[str, torch.Tensor]:
        """uint8 ``[3, H, W]`` per modality (from :meth:`load`) -> normalised float ``[3, H, W]``.

        ``rng`` (required when ``train``) supplies every random decision: the flip, the crop offset
        (shared by all modalities), then each modality's erasing, in the order of ``images``.
        """
        if self.train and rng is None:
            raise ValueError("a training transform needs the sample's SampleRNG (its random decisions are "
                             "seeded per sample, not per process)")
        h, w = self.size
        flip = self.train and rng.py.random() < self.flip_prob
        dy = dx = self.pad
        if self.train and self.pad:
            dy, dx = rng.py.randint(0, 2 * self.pad), rng.py.randint(0, 2 * self.pad)
        out = {}
        for m, img in images.items():
            x = img.float().div_(255)
            if flip:
                x = x.flip(-1)
            if self.train and self.pad:
                x = F.pad(x, (self.pad,) * 4)[:, dy:dy + h, dx:dx + w]
            x = (x - self.mean) / self.std
            if self.erasing_prob > 0:
                x = random_erase(x, rng, self.erasing_prob)
            out[m] = x
        return out
