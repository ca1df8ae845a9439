"""Benchmarks (``python run.py bench NAME``): ratios measured side by side in one process.

Every benchmark interleaves its candidates round by round (so drift in machine load hits all of
them alike), reports medians and ratios, and writes ``<out>/<name>.json`` and ``<out>/<name>.md``
atomically.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .registry import Registry
from .utils import write_atomic

BENCHMARKS: Registry[Callable[..., Dict]] = Registry("benchmark")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``reps`` rounds, each round calling every function once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(reps):
        order = list(fns.items())
        if r % 2:  # alternate the order so neither candidate always runs first
            order.reverse()
        for name, fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def environment(device: torch.device) -> Dict[str, object]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


PAIR_METHOD = ("each pair timed alone, alternating order each round (ABBA); ratio = median over rounds of "
               "t_a / t_b; iqr = its 25th-75th percentiles")


def compare_pairs(fns: Dict[str, Callable[[], object]], pairs: List[Tuple[str, str]], reps: int, warmup: int,
                  device: torch.device) -> Dict[str, Dict]:
    """Time each pair ``(a, b)`` of ``fns`` side by side: medians, per-round ratio medians and IQRs."""
    ratios, spread, times = {}, {}, {}
    for a, b in pairs:
        t = time_interleaved({"a": fns[a], "b": fns[b]}, reps=reps, warmup=warmup, device=device)
        per_round = [ta / tb for ta, tb in zip(t["a"], t["b"])]
        key = f"{a} / {b}" + (" (A/A control)" if a == b else "")
        ratios[key] = statistics.median(per_round)
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
        spread[key] = [q[0], q[2]]
        times[key] = t
    return {"median_s": {k: {"a": statistics.median(t["a"]), "b": statistics.median(t["b"])}
                         for k, t in times.items()},
            "ratios": ratios, "iqr": spread, "all_s": times}


@BENCHMARKS.register("eval")
def bench_eval(queries: int = 1000, gallery: int = 15000, reps: int = 5, warmup: int = 1) -> Dict:
    """``evaluate_rank`` on a random [queries, gallery] matrix against a row-wise ``np.argsort``.

    Every peer implementation (torchreid's and fast-reid's Python and Cython ``eval_market1501``)
    starts by arg-sorting every gallery row, so ``argsort_rows`` is a lower bound on their time;
    ``evaluate_rank`` computes the full metrics. Identities: ``gallery / 20`` of them, 6 cameras.
    """
    import numpy as np

    from .evaluation import evaluate_rank

    rng = np.random.default_rng(0)
    ids = max(2, gallery // 20)
    dist = rng.random((queries, gallery)).astype(np.float32)
    qp, gp = rng.integers(0, ids, queries), rng.integers(0, ids, gallery)
    qc, gc = rng.integers(0, 6, queries), rng.integers(0, 6, gallery)
    fns = {"evaluate_rank": lambda: evaluate_rank(dist, qp, gp, qc, gc),
           "argsort_rows": lambda: np.argsort(dist, axis=1)}
    comparison = compare_pairs(fns, [("evaluate_rank", "argsort_rows"), ("argsort_rows", "argsort_rows")],
                               reps, warmup, torch.device("cpu"))
    return {"name": "eval", "goal": "1,000 x 15,000 well under 1 s on 2 CPU cores; faster than the peers",
            "method": PAIR_METHOD, "setting": {"queries": queries, "gallery": gallery, "identities": ids,
                                               "reps": reps, "warmup": warmup},
            "environment": environment(torch.device("cpu")), **comparison}


@BENCHMARKS.register("backbone")
def bench_backbone(batch: int = 8, reps: int = 10, warmup: int = 2, tiny: bool = False,
                   device: str = "cpu") -> Dict:
    """Adapter forward vs the raw open_clip / timm forward, ViT-B/16 at 256x128.

    Candidates (all with the same weights, inference mode):

    * ``open_clip``: ``open_clip`` ViT-B-16-quickgelu ``visual(x)`` (force_image_size 256x128);
      ``adapter_clip``: ``create_backbone("clip").embed(x, cam_ids)`` with CLS camera embedding.
    * ``timm``: ``vit_base_patch16_224.forward_features(x)``; ``adapter_vit``:
      ``create_backbone("vit")(x, cam_ids)`` with all-token camera embedding (stride 16, same grid).
    * ``adapter_vit_tower``: the adapter's own timm tower called directly: the adapter minus its
      tower, i.e. the cost of the camera-embedding hook and the output split.
    """
    import open_clip
    import timm

    from .models import create_backbone

    dev = torch.device(device)
    size = (256, 128)
    arch_kw = dict(width=64, layers=2, heads=2, out_dim=64) if tiny else {}
    vit_kw = dict(embed_dim=64, depth=2, num_heads=2) if tiny else {}
    torch.manual_seed(0)
    if tiny:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        oc = CLIP(embed_dim=64, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=size),
                  text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                  quick_gelu=True)
    else:
        oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, force_image_size=size)
    raw_vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=size, **vit_kw)
    with tempfile.TemporaryDirectory() as d:
        clip_ckpt, vit_ckpt = os.path.join(d, "clip.pt"), os.path.join(d, "vit.pt")
        torch.save(oc.state_dict(), clip_ckpt)
        torch.save(raw_vit.state_dict(), vit_ckpt)
        ad_clip = create_backbone("clip", arch="ViT-B-16-quickgelu", pretrained=clip_ckpt, img_size=size,
                                  num_cams=6, sie_mode="cls", **arch_kw)
        ad_vit = create_backbone("vit", arch="vit_base_patch16_224", pretrained=vit_ckpt, img_size=size,
                                 num_cams=6, sie_coef=3.0, sie_mode="all",
                                 **{k: v for k, v in arch_kw.items() if k != "out_dim"})
    raw_clip = oc.visual
    for m in (raw_clip, raw_vit, ad_clip, ad_vit):
        m.eval().to(dev)
    x = torch.randn(batch, 3, *size, device=dev)
    cams = torch.arange(batch, device=dev) % 6
    fns = {
        "open_clip": lambda: raw_clip(x),
        "adapter_clip": lambda: ad_clip.embed(x, cams),
        "timm": lambda: raw_vit.forward_features(x),
        "adapter_vit": lambda: ad_vit(x, cams),
        "adapter_vit_tower": lambda: ad_vit.tower.forward_features(x),
    }
    pairs = [("adapter_clip", "open_clip"), ("adapter_vit", "timm"), ("adapter_vit", "adapter_vit_tower"),
             ("timm", "timm")]  # the last is an A/A control: the noise floor of this machine
    with torch.inference_mode():
        err_clip = (ad_clip.proj(ad_clip.tower.forward_features(x)[:, 0]) - raw_clip(x)).abs().max().item()
        err_vit = (ad_vit.tower.forward_features(x)[:, 0] - raw_vit.forward_features(x)[:, 0]).abs().max().item()
        comparison = compare_pairs(fns, pairs, reps, warmup, dev)
    return {
        "name": "backbone", "goal": "adapter forward <= 1.03x raw forward", "method": PAIR_METHOD,
        "setting": {"arch": "tiny (2 layers, width 64)" if tiny else "ViT-B/16", "img_size": list(size),
                    "batch": batch, "reps": reps, "warmup": warmup},
        "environment": environment(dev), **comparison,
        "max_abs_diff": {"adapter_clip tower+proj vs open_clip": err_clip,
                         "adapter_vit tower vs timm": err_vit},
    }


def to_markdown(result: Dict) -> str:
    lines = [f"# Benchmark: {result['name']}", "", f"Goal: {result.get('goal', '-')}", "",
             "Setting: " + ", ".join(f"{k}={v}" for k, v in result["setting"].items()),
             "Environment: " + ", ".join(f"{k}={v}" for k, v in result["environment"].items()), "",
             f"Method: {result['method']}", "",
             "| a / b | a median (ms) | b median (ms) | ratio (median) | ratio (iqr) |", "|---|---:|---:|---:|---:|"]
    for k, v in result["ratios"].items():
        m, q = result["median_s"][k], result["iqr"][k]
        lines.append(f"| {k} | {m['a'] * 1e3:.1f} | {m['b'] * 1e3:.1f} | {v:.3f} | {q[0]:.3f}-{q[1]:.3f} |")
    if result.get("max_abs_diff"):
        lines += ["", "| check | max abs diff |", "|---|---:|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in result["max_abs_diff"].items()]
    return "\n".join(lines) + "\n"


def run_benchmark(name: str, out_dir: Optional[str] = "experiments/benchmarks", **kwargs) -> Dict:
    """Run one registered benchmark and write ``<out_dir>/<name>.json`` and ``.md``."""
    result = BENCHMARKS.get(name)(**kwargs)
    if out_dir:
        write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(result, indent=2) + "\n")
        write_atomic(os.path.join(out_dir, f"{name}.md"), to_markdown(result))
    return result
