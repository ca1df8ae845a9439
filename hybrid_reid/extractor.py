"""Features of images in three lines (:class:`FeatureExtractor`)::

    from hybrid_reid import FeatureExtractor

    extractor = FeatureExtractor("outputs/quickstart")        # a model folder or a finished run
    feats = extractor({"rgb": ["a_rgb.jpg"], "nir": ["a_nir.jpg"], "tir": ["a_tir.jpg"]})  # [1, D]

The preprocessing (input size, bicubic resize, mean / std) is the model folder's, exactly as
``run.py extract`` and ``run.py eval`` apply it.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import PairedTransform, canonical_modality
from .data.datasets import open_image
from .modalities import is_text

logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def subset_problem(model, modalities: Sequence[str]) -> Optional[str]:
    """Why ``model`` cannot give a feature of ``modalities`` alone (None: it can).

    A fusion that fills absent modalities with a constant (``concat``'s zeros) would give features
    whose absent part is the same for every image; those are refused, never returned in silence."""
    all_mods = list(model.modalities)
    unknown = [m for m in modalities if m not in all_mods]
    if unknown:
        return f"the model was trained with modalities {all_mods}; {unknown} is not one of them"
    if sorted(modalities) == sorted(all_mods):
        return None
    fusion = model.modality_fusion
    name = type(fusion).__name__
    if fusion.handles_missing and fusion.subset_features:
        return None
    width = fusion.out_dim
    per = width // max(1, len(all_mods))
    constant = (f": {width - per * len(modalities)} of its {width} dimensions would be the same constant for every "
                "image (the absent modalities' zeros)") if not fusion.subset_features and fusion.handles_missing \
        else " (it needs every modality)"
    return (f"this model fuses {all_mods} with model.modality_fusion={_fusion_name(model)} ({name}); a feature of "
            f"{list(modalities)} alone is not something it can represent{constant}. Give every modality "
            f"({', '.join(all_mods)}), or use a model trained for it: model.modality_fusion=mean (a feature of any "
            f"subset), or data.modalities={list(modalities)}")


def _fusion_name(model) -> str:
    cfg = getattr(model, "run_config", None)
    return cfg.model.modality_fusion if cfg is not None else type(model.modality_fusion).__name__


class FeatureExtractor:
    """L2-normalised features of a trained model, from image paths, PIL images, numpy crops or tensors.

    Args:
        model: a model folder or a finished run's ``output_dir`` (``model.safetensors`` + ``config.yaml``),
            or a :class:`~hybrid_reid.models.ReIDModel` that carries its config (``from_pretrained``).
        device: ``cuda`` / ``cpu`` / ... (default: CUDA when available).
        batch_size: images per forward pass.
        overrides: dotted config overrides for the model folder's config (e.g. ``eval.feat=pre``).

    Call it with one modality's images (a single item or a list) or a ``{modality: images}`` dict of
    equally long lists (one multi-modal sample per position); items are

    * paths (``str`` / ``os.PathLike``) or PIL images;
    * numpy arrays ``[H, W, 3]`` uint8 (``bgr=True``, the default: BGR, as OpenCV and trackers hold
      crops; ``bgr=False`` for RGB) or ``[H, W]`` grey;
    * tensors ``[3, H, W]`` / ``[N, 3, H, W]``: uint8, or float in [0, 1], RGB (resized with torch's
      antialiased bicubic when not at the input size; pass paths or PIL images for results identical
      to ``run.py extract``, which resizes with PIL);
    * strings, for a ``text`` modality.

    ``cam_ids`` (``[N]``, 0-based) feed the camera embedding of a model trained with one; without
    them camera 0 is used for every image (said once in the log). Returns a float32 ``[N, D]`` CPU
    tensor.
    """

    def __init__(self, model: Union[str, os.PathLike, torch.nn.Module], device: Optional[str] = None,
                 batch_size: int = 32, overrides: Sequence[str] = ()) -> None:
        from .pretrained import load_pretrained

        if isinstance(model, torch.nn.Module):
            cfg = getattr(model, "run_config", None)
            if cfg is None:
                raise ValueError("FeatureExtractor(model): the model carries no config; load it with "
                                 "ReIDModel.from_pretrained(dir) or pass the model folder's path")
            dev = torch.device(device) if device else next(model.parameters()).device
            self.model, self.cfg = model.to(dev).eval(), cfg
        else:
            self.model, self.cfg = load_pretrained(os.fspath(model), device, overrides)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        enc = self.model.encoder
        self.transform = PairedTransform(tuple(self.cfg.model.img_size), enc.mean, enc.std, train=False)
        self.feat = self.cfg.eval.feat
        self.needs_cams = any(b.sie is not None and b.sie.num_cams > 0 for b in enc.backbones.values())
        self.needs_views = any(b.sie is not None and b.sie.num_views > 0 for b in enc.backbones.values())
        self._warned = False

    @property
    def modalities(self) -> List[str]:
        return list(self.model.modalities)

    @property
    def dim(self) -> int:
        return int(self.model.modality_fusion.out_dim)

    def __call__(self, images, cam_ids: Optional[Sequence[int]] = None, modality: Optional[str] = None,
                 bgr: bool = True) -> torch.Tensor:
        if isinstance(images, dict):
            if modality is not None:
                raise ValueError("modality= is for a single modality's images; a dict names its modalities")
            inputs = {canonical_modality(m): _as_list(v) for m, v in images.items()}
        else:
            m = canonical_modality(modality) if modality else self._default_modality()
            inputs = {m: _as_list(images)}
        if not inputs:
            raise ValueError("no images given")
        problem = subset_problem(self.model, list(inputs))
        if problem:
            raise ValueError(problem)
        inputs = {m: inputs[m] for m in self.modalities if m in inputs}  # the model's order
        lengths = {m: _count(v) for m, v in inputs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every modality needs the same number of images (one sample per position); got {lengths}")
        n = next(iter(lengths.values()))
        cams = self._ids(cam_ids, n)
        feats = []
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            batch = {m: self._prepare(m, v, start, stop, bgr) for m, v in inputs.items()}
            c = cams[start:stop].to(self.device) if cams is not None else None
            v = torch.zeros(stop - start, dtype=torch.long, device=self.device) if self.needs_views else None
            with torch.inference_mode():
                out = self.model(batch, c, v)
                f = out.retrieval_feat(self.feat)
                feats.append(F.normalize(f.float(), dim=1).cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)

    # ------------------------------------------------------------------------------------------ inputs
    def _default_modality(self) -> str:
        image_mods = [m for m in self.modalities if not is_text(m)]
        if len(self.modalities) == 1 or len(image_mods) == 1:
            return image_mods[0] if image_mods else self.modalities[0]
        return image_mods[0] if "rgb" not in image_mods else "rgb"

    def _ids(self, cam_ids, n: int) -> Optional[torch.Tensor]:
        if not self.needs_cams:
            return None
        if cam_ids is None:
            if not self._warned:
                logger.warning("this model adds a camera embedding (trained with %d cameras); no cam_ids given, so "
                               "every image uses camera 0: pass cam_ids=[...] (0-based) with the images' cameras",
                               self.cfg.model.num_cams)
                self._warned = True
            return torch.zeros(n, dtype=torch.long)
        ids = torch.as_tensor(cam_ids, dtype=torch.long).flatten()
        if ids.numel() != n:
            raise ValueError(f"cam_ids has {ids.numel()} entries for {n} images")
        return ids

    def _prepare(self, modality: str, items, start: int, stop: int, bgr: bool) -> torch.Tensor:
        if is_text(modality):
            texts = list(items[start:stop])
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"modality {modality!r} takes strings")
            return self.model.text_encoder.tokenize(texts).to(self.device)
        if isinstance(items, torch.Tensor) and items.ndim == 4:
            return self._tensor(items[start:stop])
        return torch.stack([self._one(x, bgr) for x in items[start:stop]]).to(self.device)

    def _one(self, x: ImageLike, bgr: bool) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return self._tensor(x[None])[0].cpu()
        if isinstance(x, (str, os.PathLike)):
            img = open_image(os.fspath(x))
        elif isinstance(x, Image.Image):
            img = x
        elif isinstance(x, np.ndarray):
            img = _from_numpy(x, bgr)
        else:
            raise TypeError(f"an image is a path, a PIL image, a numpy array or a tensor; got {type(x).__name__}")
        return self.transform({"x": self.transform.load(img)})["x"]

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image tensors are [3, H, W] or [N, 3, H, W]; got {tuple(x.shape)}")
        x = x.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = self.transform.size
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        mean, std = self.transform.mean.to(x), self.transform.std.to(x)
        return (x - mean) / std


def _as_list(v) -> Union[list, torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return v if v.ndim == 4 else [v]
    if isinstance(v, np.ndarray) and v.ndim in (2, 3):
        return [v]
    if isinstance(v, (str, os.PathLike, Image.Image)):
        return [v]
    return list(v)


def _count(v) -> int:
    return int(v.shape[0]) if isinstance(v, torch.Tensor) else len(v)


def _from_numpy(x: np.ndarray, bgr: bool) -> Image.Image:
    if x.dtype != np.uint8:
        raise ValueError(f"numpy images are uint8 [H, W, 3] (or [H, W]); got {x.dtype} {x.shape}")
    if x.ndim == 2:
        return Image.fromarray(x).convert("RGB")
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"numpy images are uint8 [H, W, 3] (or [H, W]); got shape {x.shape}")
    return Image.fromarray(np.ascontiguousarray(x[:, :, ::-1] if bgr else x))


__all__ = ["FeatureExtractor", "subset_problem"]
