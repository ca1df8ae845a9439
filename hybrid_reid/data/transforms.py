"""Paired image transforms: one geometry for all modalities of a sample, erasing per modality.

The peers' recipe (TransReID / TOP-ReID): resize (bicubic) -> horizontal flip -> pad + random crop
-> normalise -> random erasing (timm's, pixel mode). Here the flip and the crop offset are drawn
once per sample and applied to every modality, so the RGB, NIR and TIR images stay aligned;
random erasing is drawn per modality, as in the peers.
"""
from __future__ import annotations

import random
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.functional import pil_to_tensor


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
        self.erase = RandomErasing(erasing_prob, mode="pixel", max_count=1, device="cpu") \
            if train and erasing_prob > 0 else None

    def load(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 ``[3, H, W]`` at the network size (bicubic, as the peers' ``T.Resize``)."""
        h, w = self.size
        return pil_to_tensor(img.convert("RGB").resize((w, h), Image.BICUBIC))

    def __call__(self, images: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """uint8 ``[3, H, W]`` per modality (from :meth:`load`) -> normalised float ``[3, H, W]``."""
        h, w = self.size
        flip = self.train and random.random() < self.flip_prob
        dy = dx = self.pad
        if self.train and self.pad:
            dy, dx = random.randint(0, 2 * self.pad), random.randint(0, 2 * self.pad)
        out = {}
        for m, img in images.items():
            x = img.float().div_(255)
            if flip:
                x = x.flip(-1)
            if self.train and self.pad:
                x = F.pad(x, (self.pad,) * 4)[:, dy:dy + h, dx:dx + w]
            x = (x - self.mean) / self.std
            if self.erase is not None:
                x = self.erase(x)
            out[m] = x
        return out
