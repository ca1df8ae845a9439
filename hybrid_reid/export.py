"""``run.py export``: a model folder as ONNX or TorchScript graphs, checked against eager PyTorch.

One graph per modality combination. Inputs, in the model's modality order, are the images of each
modality, normalised as the model folder says (``[B, 3, H, W]`` float32; :class:`FeatureExtractor`'s
preprocessing), then ``cam_ids`` ``[B]`` int64 when the model has a camera embedding (and
``view_ids`` when it has a view embedding); the output is the L2-normalised feature ``[B, D]``, the
same as :class:`~hybrid_reid.FeatureExtractor` returns. The batch size is dynamic.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .utils import atomic_path, require_packages, write_atomic

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


class FeatureGraph(nn.Module):
    """The exported computation: ``(*images, [cam_ids], [view_ids]) -> L2-normalised feature``."""

    def __init__(self, model: nn.Module, modalities: Sequence[str], feat: str, cams: bool, views: bool) -> None:
        super().__init__()
        self.model, self.modalities, self.feat = model, list(modalities), feat
        self.cams, self.views = cams, views

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = len(self.modalities)
        images = dict(zip(self.modalities, args[:n]))
        rest = list(args[n:])
        cam_ids = rest.pop(0) if self.cams else None
        view_ids = rest.pop(0) if self.views else None
        out = self.model(images, cam_ids, view_ids)
        return F.normalize(out.retrieval_feat(self.feat).float(), dim=1)

    def input_names(self) -> List[str]:
        return [*self.modalities, *(["cam_ids"] if self.cams else []), *(["view_ids"] if self.views else [])]

    def example(self, batch: int, size, generator: torch.Generator) -> List[torch.Tensor]:
        h, w = size
        xs = [torch.randn(batch, 3, h, w, generator=generator) for _ in self.modalities]
        ids = []
        if self.cams:
            ids.append(torch.arange(batch) % max(1, self._sie("num_cams")))
        if self.views:
            ids.append(torch.arange(batch) % max(1, self._sie("num_views")))
        return xs + ids

    def _sie(self, attr: str) -> int:
        return max(getattr(b.sie, attr) for b in self.model.encoder.backbones.values() if b.sie is not None)


def parse_combinations(spec: Optional[Sequence[str]], modalities: Sequence[str]) -> List[List[str]]:
    """``["rgb+nir+tir", "rgb"]`` -> modality lists in the model's order (default: all modalities)."""
    from .data import canonical_modality

    if not spec:
        return [list(modalities)]
    out = []
    for s in spec:
        mods = [canonical_modality(m) for m in s.replace(",", "+").split("+") if m]
        unknown = [m for m in mods if m not in modalities]
        if unknown or not mods:
            raise ValueError(f"--modalities {s}: the model's modalities are {list(modalities)}; {unknown or s} is not "
                             "a combination of them (write e.g. rgb+nir)")
        out.append([m for m in modalities if m in mods])
    return out


def export_model(model_dir: str, fmt: str, out_dir: Optional[str] = None,
                 combinations: Optional[Sequence[str]] = None, opset: int = 17,
                 check_batch: int = 3) -> Dict[str, Dict[str, object]]:
    """Export a model folder's feature graph(s) and check each against eager PyTorch.

    Args:
        model_dir: a model folder or a finished run's ``output_dir``.
        fmt: ``onnx`` (checked with onnxruntime) or ``torchscript`` (``torch.jit.trace``).
        out_dir: where the graphs go (default ``<model_dir>/export``): ``model.<combination><suffix>``
            and ``export.json`` (inputs, output, parity).
        combinations: modality combinations (``rgb+nir+tir``, ``rgb``); default all modalities.
        check_batch: the parity check's batch, different from the export's 2 to check the dynamic batch.

    Returns:
        ``{combination: {"path", "inputs", "output_dim", "max_abs_diff"}}``.

    Raises:
        ValueError: an unknown format or combination, one the model's fusion cannot represent, or a
            graph whose output differs from eager by more than 1e-4.
        MissingPackageError: onnx / onnxruntime missing (``pip install hybrid_reid[export]``).
    """
    from .extractor import subset_problem
    from .pretrained import load_pretrained

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_packages("--format onnx", {"onnx": "onnx", "onnxruntime": "onnxruntime"}, extra="export")
    model, cfg = load_pretrained(model_dir, device="cpu")
    out_dir = out_dir or os.path.join(model_dir, "export")
    os.makedirs(out_dir, exist_ok=True)
    sie = [b.sie for b in model.encoder.backbones.values() if b.sie is not None]
    cams, views = any(s.num_cams > 0 for s in sie), any(s.num_views > 0 for s in sie)
    report: Dict[str, Dict[str, object]] = {}
    g = torch.Generator().manual_seed(0)
    for mods in parse_combinations(combinations, model.modalities):
        problem = subset_problem(model, mods)
        if problem:
            raise ValueError(f"--modalities {'+'.join(mods)}: {problem}")
        graph = FeatureGraph(model, mods, cfg.eval.feat, cams, views).eval()
        name = "+".join(mods)
        path = os.path.join(out_dir, f"model.{name}{SUFFIX[fmt]}")
        example = graph.example(2, cfg.model.img_size, g)
        check = graph.example(check_batch, cfg.model.img_size, g)
        with torch.no_grad():
            expected = graph(*check)
            if fmt == "onnx":
                got = _onnx(graph, example, check, path, opset)
            else:
                got = _torchscript(graph, example, check, path)
        diff = float((got - expected).abs().max())
        logger.info("%s: %s, max |diff| against eager %.2e (batch %d)", path, fmt, diff, check_batch)
        if not diff < TOLERANCE:
            os.remove(path)
            raise ValueError(f"{fmt} export of {name}: the graph's output differs from eager PyTorch by {diff:.2e} "
                             f"(> {TOLERANCE}); the file was not kept")
        report[name] = {"path": path, "inputs": graph.input_names(), "output_dim": int(expected.shape[1]),
                        "max_abs_diff": diff}
    write_atomic(os.path.join(out_dir, "export.json"), json.dumps(
        {"format": fmt, "model_dir": os.path.abspath(model_dir), "input_size": list(cfg.model.img_size),
         "mean": list(model.encoder.mean), "std": list(model.encoder.std), "graphs": report}, indent=2) + "\n")
    return report


def _onnx(graph: FeatureGraph, example, check, path: str, opset: int) -> torch.Tensor:
    import onnxruntime as ort

    names = graph.input_names()
    with atomic_path(path) as tmp:
        torch.onnx.export(graph, tuple(example), tmp, dynamo=False, input_names=names, output_names=["feat"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "feat"]}, opset_version=opset)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(names, check)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _torchscript(graph: FeatureGraph, example, check, path: str) -> torch.Tensor:
    traced = torch.jit.trace(graph, tuple(example), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(tmp)
    loaded = torch.jit.load(path)
    return loaded(*check)
