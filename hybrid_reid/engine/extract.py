"""Embed a folder of images with a trained model (``run.py extract``), for downstream use."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from accelerate import Accelerator

from .. import modalities
from ..config import Config
from ..data import DataError, Sample, build_test_loader, canonical_modality, load_data
from ..data.datasets import IMAGE_EXTENSIONS, paired_names
from ..extractor import subset_problem
from ..models import build_model, load_model_weights
from .evaluator import FeatureSet, extract_features, save_features
from .train import _cpu_only, _tokenizer, _transform, resolve_config

logger = logging.getLogger(__name__)


def _image_modality_dir(name: str) -> bool:
    """Whether a folder name names an image modality (``RGB``, ``NI``, ``vis``, ``sk``, a declared one ...)."""
    try:
        return not modalities.is_text(name)
    except ValueError:
        return False


def folder_samples(root: str, modality: Optional[str] = None, cam: int = 0,
                   order: Sequence[str] = ()) -> Tuple[List[Sample], List[str]]:
    """The images under ``root`` as samples (pid -1, camera ``cam``) and their modalities (in
    ``order``'s order, then the others).

    A folder whose sub-folders are named by modality (``RGB/ NI/ TI/``, ``vis/ nir/ cp/ sk/`` ...)
    gives one multi-modal sample per file name found in all of them (paired by identical names);
    any other folder gives one ``modality`` sample per image file (searched recursively).
    """
    if not os.path.isdir(root):
        raise DataError(f"--images {root}: not a folder")
    subdirs = {modalities.canonical(d): os.path.join(root, d) for d in sorted(os.listdir(root))
               if os.path.isdir(os.path.join(root, d)) and _image_modality_dir(d)}
    if subdirs:
        rank = {m: i for i, m in enumerate(order)}
        subdirs = dict(sorted(subdirs.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        names = paired_names(subdirs, root, "extract")
        return [Sample({m: os.path.join(d, n) for m, d in subdirs.items()}, -1, cam) for n in names], list(subdirs)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"--images {root}: no {'/'.join(IMAGE_EXTENSIONS)} files found")
    m = canonical_modality(modality or "rgb")
    return [Sample({m: f}, -1, cam) for f in files], [m]


def extract_folder(cfg: Config, checkpoint: str, images: str, out: str, modality: Optional[str] = None,
                   cam: int = 0) -> Dict[str, object]:
    """Embed every image (or modality-paired file) under ``images`` and write ``out``
    (``.safetensors`` / ``.npz``: ``images.feat`` [N, F'], ``images.paths``; see
    :func:`~hybrid_reid.engine.save_features`).

    ``cfg`` is best the run's resolved ``OUTPUT_DIR/config.yaml`` (its ``model.num_classes`` and
    ``num_cams`` fit the checkpoint, no data set needed); with ``model.num_classes: 0`` the data set
    is loaded to resolve them, as ``run.py eval`` does.
    """
    if cfg.model.num_classes == 0:
        cfg = resolve_config(cfg, load_data(cfg.data))
    model_mods = [canonical_modality(m) for m in cfg.data.modalities]
    samples, mods = folder_samples(images, modality or modalities.image_modalities(model_mods)[0], cam,
                                   order=model_mods)
    missing = [m for m in mods if m not in model_mods]
    if missing:
        raise DataError(f"--images {images} holds {missing}, which the model (data.modalities={model_mods}) "
                        "was not trained with")
    accelerator = Accelerator(cpu=_cpu_only())
    model = build_model(cfg.model, load_pretrained=False, modalities=model_mods, anchor=cfg.data.anchor_modality)
    problem = subset_problem(model, mods)
    if problem:
        raise DataError(f"--images {images}: {problem}")
    load_model_weights(model, checkpoint, inference=True)
    loader = build_test_loader(samples, mods, _transform(cfg, model, train=False), cfg.data.test_batch_size,
                               cfg.data.num_workers, tokenize=_tokenizer(model))
    model, loader = accelerator.prepare(model, loader)
    feats = extract_features(accelerator, model, loader, cfg.eval.feat, mods, desc="extract")
    if accelerator.is_main_process:
        save_features(out, {"images": FeatureSet.of(feats, samples, mods)},
                      {"checkpoint": os.path.abspath(checkpoint), "modalities": mods, "feat": cfg.eval.feat})
        logger.info("%d x %d features (%s) -> %s", feats.shape[0], feats.shape[1], "+".join(mods), out)
    return {"num_images": len(samples), "dim": int(feats.shape[1]), "modalities": mods, "out": out}
