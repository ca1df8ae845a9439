"""Self-contained model folders: weights with metadata, the resolved config and a model card.

A model folder (``ReIDModel.save_pretrained(dir)``; every training run's ``OUTPUT_DIR`` is one)::

    model.safetensors   the weights; the header's metadata says what they are (format, architecture,
                        modalities, input size, mean / std, feature width, project version)
    config.yaml         the resolved config (classes, cameras and views filled in from the data set)
    README.md           the model card: data set, metrics with their protocol, the training command,
                        date and library versions

``ReIDModel.from_pretrained(dir)`` (and :class:`~hybrid_reid.FeatureExtractor`) rebuilds the model
from ``config.yaml`` alone, offline, without the data set and without the ID classifiers, which
inference never uses.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import yaml

from .config import Config, ConfigError, load_config, to_dict
from .utils import atomic_path, write_atomic

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
FORMAT = "hybrid_reid.model.v1"


def _version() -> str:
    from . import __version__

    return __version__


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a model's numbers depend on."""
    import accelerate
    import open_clip
    import timm

    return {"hybrid_reid": _version(), "torch": torch.__version__, "timm": timm.__version__,
            "open_clip": open_clip.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def model_metadata(model, cfg: Config) -> Dict[str, str]:
    """The safetensors header metadata of a model folder (strings; JSON for structured values)."""
    m = cfg.model
    return {
        "format": FORMAT,
        "hybrid_reid_version": _version(),
        "architecture": json.dumps({t: s.arch for t, s in m.towers.items()}),
        "fusion": m.fusion if len(m.towers) > 1 else "",
        "modality_fusion": m.modality_fusion,
        "modalities": json.dumps(list(model.modalities)),
        "input_size": json.dumps(list(m.img_size)),
        "mean": json.dumps([float(v) for v in model.encoder.mean]),
        "std": json.dumps([float(v) for v in model.encoder.std]),
        "feature_dim": str(model.modality_fusion.out_dim),
        "eval_feat": cfg.eval.feat,
        "num_cams": str(m.num_cams),
        "num_views": str(m.num_views),
    }


#: metadata values stored as JSON (the rest are plain strings)
JSON_KEYS = ("architecture", "modalities", "input_size", "mean", "std", "feature_dim")


def read_metadata(path: str) -> Dict[str, object]:
    """A model file's metadata, JSON values decoded (``{}`` for a file written without it)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    out: Dict[str, object] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if k in JSON_KEYS else v
        except json.JSONDecodeError:
            out[k] = v
    return out


def save_pretrained(model, directory: str, cfg: Config, metrics: Optional[Mapping[str, object]] = None,
                    command: Optional[Sequence[str]] = None) -> str:
    """Write ``model`` as a model folder (each file atomically: weights, config, card).

    Args:
        model: a :class:`~hybrid_reid.models.ReIDModel` (unwrapped).
        cfg: the resolved config the model was built from.
        metrics: the run's ``metrics.json`` content, for the card (default: read from ``directory``).
        command: the training command, for the card.

    Returns:
        ``directory``.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(directory, MODEL_FILE)) as tmp:
        save_file(state, tmp, metadata=model_metadata(model, cfg))
    write_atomic(os.path.join(directory, CONFIG_FILE), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_model_card(directory, cfg, model, metrics, command)
    return directory


def _read_metrics(directory: str) -> Optional[Dict[str, object]]:
    path = os.path.join(directory, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_model_card(directory: str, cfg: Config, model=None, metrics: Optional[Mapping[str, object]] = None,
                     command: Optional[Sequence[str]] = None) -> str:
    """``README.md`` of a model folder: what the model is, how it was trained and how well it ranks."""
    metrics = metrics if metrics is not None else _read_metrics(directory)
    m = cfg.model
    towers = ", ".join(f"{t} ({s.arch})" for t, s in m.towers.items())
    mods = list(model.modalities) if model is not None else list(cfg.data.modalities)
    dim = model.modality_fusion.out_dim if model is not None else "?"
    name = os.path.basename(os.path.abspath(directory))
    lines = ["---", "library_name: hybrid_reid", "tags: [re-identification, multi-modal]",
             f"datasets: [{cfg.data.name}]", "---", "", f"# {name}", "",
             f"A hybrid_reid re-identification model: towers {towers}"
             + (f" fused by `{m.fusion}`" if len(m.towers) > 1 else "")
             + f"; modalities {', '.join(mods)} fused by `{m.modality_fusion}`; input {m.img_size[0]}x{m.img_size[1]};"
             f" {dim}-d features (`eval.feat: {cfg.eval.feat}`).", "",
             "```python", "from hybrid_reid import FeatureExtractor", "",
             f"extractor = FeatureExtractor({directory!r})", _usage(model, mods), "```", ""]
    if metrics:
        proto = metrics.get("protocol", cfg.eval.protocol)
        lines += [f"## Evaluation ({metrics.get('dataset', cfg.data.name)}, protocol `{proto}`, "
                  f"metric `{cfg.eval.metric}`{', re-ranking' if cfg.eval.rerank else ''})", "",
                  "| mAP | R1 | R5 | R10 | mINP |", "|---:|---:|---:|---:|---:|",
                  "| " + " | ".join(f"{float(metrics[k]):.2f}" if k in metrics else "-"
                                    for k in ("mAP", "rank1", "rank5", "rank10", "mINP")) + " |", ""]
        if metrics.get("num_query") is not None:
            lines += [f"{metrics['num_query']} queries against {metrics.get('num_gallery')} gallery samples"
                      f" (query modalities {metrics.get('query_modalities') or 'all'}, gallery "
                      f"{metrics.get('gallery_modalities') or 'all'}).", ""]
    else:
        lines += ["## Evaluation", "", "Not evaluated when this folder was written.", ""]
    lines += ["## Training", "", f"Data set `{cfg.data.name}` (modalities {', '.join(cfg.data.modalities)}), "
              f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size} (K = {cfg.data.num_instances}), "
              f"{cfg.optim.name} lr {cfg.optim.lr}, seed {cfg.seed}."]
    if command:
        lines += ["", "```bash", " ".join(command), "```"]
    lines += ["", f"The resolved config is `{CONFIG_FILE}`; the weights are `{MODEL_FILE}`.", "",
              "## Versions", "", f"Written {datetime.date.today().isoformat()} with "
              + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + "."]
    path = os.path.join(directory, CARD_FILE)
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _usage(model, mods: Sequence[str]) -> str:
    """The model card's extractor call: one modality's images when the model can embed them alone."""
    from .extractor import subset_problem

    if model is not None and subset_problem(model, mods[:1]) is None:
        return f'features = extractor(["a.jpg", "b.jpg"], modality="{mods[0]}")   # [2, D], L2-normalised'
    sample = ", ".join(f'"{m}": ["a_{m}.jpg"]' for m in mods)
    return f"features = extractor({{{sample}}})   # [1, D], L2-normalised"


def resolve_model_dir(path: str) -> Tuple[str, str]:
    """``(config.yaml, model.safetensors)`` of a model folder or a run's output folder.

    Raises:
        FileNotFoundError: naming what is missing and what a model folder holds.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        directory = os.path.dirname(path) or "."
        weights = path
    else:
        directory, weights = path, os.path.join(path, MODEL_FILE)
    config = os.path.join(directory, CONFIG_FILE)
    missing = [p for p in (config, weights) if not os.path.isfile(p)]
    if not os.path.isdir(directory) or missing:
        raise FileNotFoundError(
            f"{path}: not a model folder (missing {', '.join(missing) or directory}). A model folder holds "
            f"{MODEL_FILE} and {CONFIG_FILE}: a finished training run's output_dir, or one written by "
            "model.save_pretrained(dir)")
    return config, weights


def load_pretrained(path: str, device: Optional[str] = None, overrides: Sequence[str] = ()):
    """``(model, cfg)``: the model of a model folder (or a run's output folder) in eval mode, without
    ID classifiers, on ``device`` (default: CUDA when available); ``overrides`` edit its config
    (e.g. ``eval.feat=pre``)."""
    from .data import canonical_modality
    from .models import build_model
    from .models.checkpoint import load_model_weights

    config, weights = resolve_model_dir(path)
    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None
    import dataclasses

    model_cfg = dataclasses.replace(cfg.model, num_classes=0)  # inference: no classifiers, no data set
    mods = [canonical_modality(m) for m in cfg.data.modalities]
    model = build_model(model_cfg, load_pretrained=False, modalities=mods, anchor=cfg.data.anchor_modality)
    load_model_weights(model, weights, inference=True)
    model.run_config = cfg
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval(), cfg
