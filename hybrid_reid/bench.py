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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    parts = []
    for a, b in pairs:
        key = f"{a} / {b}" + (" (A/A control)" if a == b else "")
        t = time_interleaved({"a": fns[a], "b": fns[b]}, reps=reps, warmup=warmup, device=device)
        parts.append({**compare_sums(t, {key: (["a"], ["b"])}), "all_s": {key: t}})
    return _merge(*parts)


def compare_sums(times: Dict[str, List[float]], ratios: Dict[str, Tuple[Sequence[str], Sequence[str]]]) -> Dict:
    """Per-round ratios of sums of interleaved timings: ``{name: (numerator fns, denominator fns)}``."""
    out, spread = {}, {}
    for key, (num, den) in ratios.items():
        per_round = [sum(times[n][r] for n in num) / sum(times[d][r] for d in den) for r in range(len(times[num[0]]))]
        out[key] = statistics.median(per_round)
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
        spread[key] = [q[0], q[2]]
    return {"median_s": {k: {"a": statistics.median([sum(ts) for ts in zip(*(times[n] for n in num))]),
                             "b": statistics.median([sum(ts) for ts in zip(*(times[d] for d in den))])}
                         for k, (num, den) in ratios.items()},
            "ratios": out, "iqr": spread, "all_s": times}


SUM_METHOD = ("all candidates timed in every round (order reversed every other round); ratio = median over "
              "rounds of the per-round ratio; iqr = its 25th-75th percentiles")


def _merge(*parts: Dict) -> Dict:
    merged: Dict[str, Dict] = {}
    for part in parts:
        for key in ("median_s", "ratios", "iqr", "all_s"):
            merged.setdefault(key, {}).update(part[key])
    return merged


def _labels(rng, queries: int, gallery: int, ids: int, cams: int):
    return (rng.integers(0, ids, queries), rng.integers(0, ids, gallery), rng.integers(0, cams, queries),
            rng.integers(0, cams, gallery))


MSMT17_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from hybrid_reid.evaluation import evaluate_features

def hwm_gb():  # this process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20

nq, ng, dim, ids, cams, chunk = (int(a) if a != "None" else None for a in sys.argv[1:7])
g = torch.Generator().manual_seed(0)
rng = np.random.default_rng(0)
qp, gp = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
qc, gc = rng.integers(0, cams, nq), rng.integers(0, cams, ng)
centers = torch.randn(ids, dim, generator=g)
qf = centers[torch.from_numpy(qp)] + 3.0 * torch.randn(nq, dim, generator=g)
gf = centers[torch.from_numpy(gp)] + 3.0 * torch.randn(ng, dim, generator=g)
del centers
before = hwm_gb()
t0 = time.perf_counter()
r = evaluate_features(qf, gf, qp, gp, qc, gc, chunk_size=chunk)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_gb": hwm_gb(), "rss_before_eval_gb": before, "mAP": r["mAP"],
                  "rank1": float(r["cmc"][0]), "num_valid_queries": r["num_valid_queries"]}))
"""


def run_msmt17_scale(queries: int = 11659, gallery: int = 82161, dim: int = 512, ids: int = 3060, cams: int = 15,
                     chunk_size: Optional[int] = None) -> Dict[str, object]:
    """``evaluate_features`` at MSMT17's test size in a fresh process (so its peak RSS is its own)."""
    import subprocess
    import sys

    args = [str(a) for a in (queries, gallery, dim, ids, cams, chunk_size)]
    proc = subprocess.run([sys.executable, "-c", MSMT17_SCRIPT, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the MSMT17-size evaluation failed:\n{proc.stderr[-2000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["full_matrix_gb"] = queries * gallery * 4 / 2**30
    return figures


@BENCHMARKS.register("eval")
def bench_eval(queries: int = 1000, gallery: int = 15000, reps: int = 3, warmup: int = 1, tiny: bool = False,
               msmt17: bool = True) -> Dict:
    """Ranking and re-ranking against the algorithms the peers ship, plus an MSMT17-size run.

    * ``evaluate_rank`` vs :func:`~hybrid_reid.evaluation.reference.reference_rank` (torchreid's /
      fast-reid's ``eval_market1501``: arg-sort every row, then a loop over queries) on random
      distance matrices of ``queries x gallery`` and ``5 * queries x (gallery + 5000)`` (1k x 15k
      and 5k x 20k by default); ``gallery / 20`` identities, 6 cameras. Both give the same numbers
      (checked here too).
    * ``re_ranking`` vs the published per-image algorithm at ``queries x gallery / 3`` (1k x 5k).
    * ``evaluate_features`` at MSMT17's size (11,659 x 82,161, 512-d) in a fresh process: wall time
      and peak RSS (``msmt17=False`` skips it).
    ``tiny`` divides every size by 10 (a smoke run).
    """
    import numpy as np

    from .evaluation import compute_distance, evaluate_rank, re_ranking
    from .evaluation.reference import reference_rank, reference_re_ranking

    div = 10 if tiny else 1
    rng = np.random.default_rng(0)
    sizes = [(queries // div, gallery // div), (5 * queries // div, (gallery + 5000) // div)]
    parts, checks = [], {}
    for nq, ng in sizes:
        dist = rng.random((nq, ng)).astype(np.float32)
        labels = _labels(rng, nq, ng, max(2, ng // 20), 6)
        tag = f" @{nq}x{ng}"
        fns = {"evaluate_rank" + tag: lambda d=dist, lb=labels: evaluate_rank(d, *lb),
               "reference_loop" + tag: lambda d=dist, lb=labels: reference_rank(d, *lb)}
        parts.append(compare_pairs(fns, [("evaluate_rank" + tag, "reference_loop" + tag)], reps, warmup,
                                   torch.device("cpu")))
        ours, ref = evaluate_rank(dist, *labels), reference_rank(dist, *labels)
        checks[f"mAP evaluate_rank vs reference{tag}"] = abs(ours["mAP"] - ref[0])
    # re-ranking on features (distances with structure), 1k x 5k
    nq, ng = queries // div, gallery // 3 // div
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(nq + ng, 64, generator=g)
    qf, gf = feats[:nq], feats[nq:]
    q_g, q_q, g_g = (compute_distance(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    tag = f" @{nq}x{ng}"
    fns = {"re_ranking" + tag: lambda: re_ranking(q_g, q_q, g_g),
           "reference_re_ranking" + tag: lambda: reference_re_ranking(q_g, q_q, g_g, 20, 6, 0.3)}
    parts.append(compare_pairs(fns, [("re_ranking" + tag, "reference_re_ranking" + tag)], 1, 0,
                               torch.device("cpu")))
    checks[f"re_ranking vs reference{tag}"] = float(np.abs(re_ranking(q_g, q_q, g_g)
                                                           - reference_re_ranking(q_g, q_q, g_g, 20, 6, 0.3)).max())
    result = {"name": "eval",
              "goal": "faster than the peers' per-query loop; MSMT17 size (11,659 x 82,161, 512-d) in < 2 min "
                      "with peak RSS < 3 GB on 2 CPU cores",
              "method": PAIR_METHOD + "; re-ranking: one timed round", "setting": {
                  "sizes": [list(s) for s in sizes], "rerank_size": [nq, ng], "identities": "gallery / 20",
                  "cameras": 6, "reps": reps, "warmup": warmup},
              "environment": environment(torch.device("cpu")), **_merge(*parts), "max_abs_diff": checks}
    if msmt17:
        result["figures"] = {"msmt17": run_msmt17_scale(11659 // div, 82161 // div)}
    return result


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


# ----------------------------------------------------------------------------- training steps
TINY_MODEL = {"img_size": [64, 32], "feat_dim": 64,
              "clip": {"pretrained": None, "tower_kwargs": {"width": 64, "layers": 2, "heads": 2, "out_dim": 64}},
              "vit": {"pretrained": None, "tower_kwargs": {"width": 64, "layers": 2, "heads": 2}},
              "text": {"pretrained": None}}


def bench_config(model: Dict, tiny: bool, modalities: Sequence[str] = ("rgb", "nir", "tir"), batch: int = 8):
    """A :class:`~hybrid_reid.config.Config` for a benchmark: ViT-B/16 at 256x128 (``base.yaml``'s
    towers, random init) or the tiny towers, with ``model`` merged in; SIE on (6 cameras)."""
    from .config import Config, deep_merge, from_dict

    spec = deep_merge(TINY_MODEL if tiny else {}, {"num_cams": 6, **model})
    return from_dict(Config, {"model": spec, "data": {"modalities": list(modalities), "batch_size": batch,
                                                      "num_instances": 2}})


def build_step(cfg, num_classes: int, device: torch.device, compile: bool = False):
    """``(model, step)``: ``step(batch)`` is one training step (forward, losses, backward, AdamW;
    bf16 autocast and fused AdamW on a GPU; ``compile``: the model under ``torch.compile``)."""
    import dataclasses

    from .engine.train import build_optimizer
    from .losses import build_criterion
    from .models import build_model

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes)
    model = build_model(model_cfg, load_pretrained=False, modalities=cfg.data.modalities).to(device).train()
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    criterion = build_criterion(cfg.loss, cfg.model.clip_consistency)
    forward = torch.compile(model) if compile else model

    def step(batch):
        # on a GPU, bf16 autocast (the mixed precision a run would use); fp32 on a CPU
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = forward(batch["images"], batch["cam_ids"])
            losses = criterion(out, batch["pids"], 0)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses["total"].detach()

    return model, step


def fake_batch(cfg, device: torch.device) -> Dict[str, object]:
    """A PK batch of random images for every modality of ``cfg`` (2 images per identity, 6 cameras)."""
    g = torch.Generator().manual_seed(0)
    b, (h, w) = cfg.data.batch_size, cfg.model.img_size
    return {"images": {m: torch.randn(b, 3, h, w, generator=g).to(device) for m in cfg.data.modalities},
            "cam_ids": (torch.arange(b) % 6).to(device), "pids": (torch.arange(b) // 2).to(device)}


def _setting(tiny: bool, batch: int, modalities: Sequence[str], reps: int, warmup: int) -> Dict[str, object]:
    return {"arch": "tiny (2 layers, width 64, 64x32)" if tiny else "ViT-B/16 at 256x128 (random init)",
            "batch": batch, "modalities": list(modalities), "images_per_step": batch * len(modalities),
            "reps": reps, "warmup": warmup}


def step_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# dense bf16 tensor-core peaks (FLOP/s) of the GPUs this project is run on; MFU = achieved / peak
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


@BENCHMARKS.register("hybrid")
def bench_hybrid(batch: int = 4, reps: int = 5, warmup: int = 1, tiny: bool = False, device: str = "cpu") -> Dict:
    """Training-step cost of the hybrid against its parts, and of the multi-scale extractor.

    Candidates (same batch, AdamW, ID + triplet losses, SIE on, ``base.yaml``'s towers: CLIP stride
    16, ViT stride 12): ``clip``, ``vit`` (one tower each), ``hybrid`` (both, ``concat`` fusion) and
    ``hybrid_ms`` (``hybrid`` with the multi-scale sliding-window extractor on both towers).
    Ratios: ``hybrid / (clip + vit)`` (goal <= 1.10: fusing costs little beyond running both towers)
    and ``hybrid_ms / hybrid`` (the multi-scale overhead). Figures: images/s, FLOPs per step
    (FlopCounterMode: matmuls, convolutions, attention), achieved TFLOP/s and, on a GPU (bf16
    autocast), MFU against the card's dense bf16 peak.
    """
    dev = torch.device(device)
    modalities = ("rgb", "nir", "tir")
    variants = {"clip": {"backbone": "clip"}, "vit": {"backbone": "vit"},
                "hybrid": {"backbone": "hybrid", "fusion": "concat"},
                "hybrid_ms": {"backbone": "hybrid", "fusion": "concat", "multi_scale": {"enabled": True}}}
    fns, params = {}, {}
    for name, spec in variants.items():
        cfg = bench_config(spec, tiny, modalities, batch)
        model, step = build_step(cfg, batch // 2, dev)
        params[name] = sum(p.numel() for p in model.parameters())
        batch_data = fake_batch(cfg, dev)
        fns[name] = lambda step=step, b=batch_data: step(b)
    times = time_interleaved(fns, reps, warmup, dev)
    comparison = compare_sums(times, {"hybrid / (clip + vit)": (["hybrid"], ["clip", "vit"]),
                                      "hybrid_ms / hybrid": (["hybrid_ms"], ["hybrid"]),
                                      "clip / vit": (["clip"], ["vit"])})
    images = batch * len(modalities)
    flops = {k: step_flops(fns[k]) for k in fns}
    figures = {"images_per_s": {k: images / statistics.median(t) for k, t in times.items()},
               "params_m": {k: v / 1e6 for k, v in params.items()},
               "tflops_per_step": {k: f / 1e12 for k, f in flops.items()},
               "achieved_tflops_per_s": {k: flops[k] / statistics.median(t) / 1e12 for k, t in times.items()}}
    peak = peak_flops(dev)
    if peak:
        figures["mfu"] = {k: flops[k] / statistics.median(t) / peak for k, t in times.items()}
    return {"name": "hybrid", "goal": "hybrid step <= 1.10x (clip step + vit step)", "method": SUM_METHOD,
            "setting": _setting(tiny, batch, modalities, reps, warmup), "environment": environment(dev),
            **comparison, "figures": figures}


@BENCHMARKS.register("mer")
def bench_mer(batch: int = 4, reps: int = 5, warmup: int = 1, tiny: bool = False, device: str = "cpu",
              backbone: str = "clip") -> Dict:
    """Cost of the MER LoRA experts in training and, merged, at inference.

    Training steps (``backbone`` tower, frozen, rgb + nir + tir):

    * ``frozen_tok``: frozen tower, per-modality tokenizers trained; ``lora_tok``: the same plus
      MER LoRA (rank 4, every block). The gradient reaches the tokenizers through the tower in
      both, so the ratio is what LoRA adds (goal <= 1.15).
    * ``frozen`` / ``lora``: without tokenizers. A frozen tower with nothing trainable before it
      needs no backward pass through the tower at all; with LoRA it does, so this ratio is about
      the cost of a backward pass, not of LoRA, and has no goal.
    * ``full``: the whole tower fine-tuned (for context).

    Inference (eval mode, rgb only): ``merged`` (LoRA trained away from zero, then folded into the
    weights with ``experts.merge``) vs ``plain`` (the same tower without MER) — goal 1.00 — and
    ``unmerged`` (the LoRA branches computed on the fly). The merged output is checked against the
    unmerged one.
    """
    dev = torch.device(device)
    modalities = ("rgb", "nir", "tir")
    base = {"backbone": backbone, "fusion": "concat"}
    variants = {"frozen_tok": {"freeze_backbone": True, "tokenizers": {"enabled": True}},
                "lora_tok": {"freeze_backbone": True, "tokenizers": {"enabled": True}, "mer": {"enabled": True}},
                "frozen": {"freeze_backbone": True}, "lora": {"freeze_backbone": True, "mer": {"enabled": True}},
                "full": {}}
    fns, models = {}, {}
    for name, spec in variants.items():
        cfg = bench_config({**base, **spec}, tiny, modalities, batch)
        model, step = build_step(cfg, batch // 2, dev)
        models[name] = model
        batch_data = fake_batch(cfg, dev)
        fns[name] = lambda step=step, b=batch_data: step(b)
    times = time_interleaved(fns, reps, warmup, dev)
    train = compare_sums(times, {"lora_tok / frozen_tok": (["lora_tok"], ["frozen_tok"]),
                                 "lora / frozen": (["lora"], ["frozen"]), "full / frozen": (["full"], ["frozen"])})
    # inference: the LoRA model after its training steps (B != 0), merged for rgb, vs the plain tower
    lora = models["lora"].eval()
    plain = models["full"].eval()  # the same architecture without MER
    x = {"rgb": fake_batch(bench_config(base, tiny, ("rgb",), batch), dev)["images"]["rgb"]}
    cams = (torch.arange(batch) % 6).to(dev)
    with torch.inference_mode():
        unmerged_out = lora(x, cams).bn_feat.clone()
        towers = list(lora.encoder.backbones.values())
        for t in towers:
            t.experts.merge("rgb")
        merged_out = lora(x, cams).bn_feat
        inference = compare_pairs({"merged": lambda: lora(x, cams), "plain": lambda: plain(x, cams)},
                                  [("merged", "plain"), ("plain", "plain")], reps * 2, warmup, dev)
        for t in towers:
            t.experts.unmerge()
        unmerged = compare_pairs({"unmerged": lambda: lora(x, cams), "plain": lambda: plain(x, cams)},
                                 [("unmerged", "plain")], reps * 2, warmup, dev)
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    return {"name": "mer", "goal": "LoRA step <= 1.15x frozen-backbone step; merged-LoRA inference 1.00x plain tower",
            "method": SUM_METHOD + " (training); " + PAIR_METHOD + " (inference)",
            "setting": {**_setting(tiny, batch, modalities, reps, warmup), "backbone": backbone,
                        "lora": "rank 4, alpha 1, every block, qkv/proj/fc1/fc2, one expert per modality"},
            "environment": environment(dev), **_merge(train, inference, unmerged),
            "max_abs_diff": {"merged vs unmerged LoRA (bn_feat)": float((merged_out - unmerged_out).abs().max())},
            "figures": {"params": {"lora_m": lora_params / 1e6,
                                   "trainable_m": {k: sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
                                                   for k, m in models.items()}}}}


@BENCHMARKS.register("mamba")
def bench_mamba(batch: int = 4, reps: int = 5, warmup: int = 1, tiny: bool = False, device: str = "cpu") -> Dict:
    """MambaPro's aggregation: the plain-PyTorch selective scan against mamba-ssm's CUDA kernel, and
    what the aggregation adds to a training step.

    * ``scan``: one selective scan, forward + backward, at the size of MambaPro's inter-modality
      scan (Di = 2F channels, L = 3 x 128 tokens, state 16; ``tiny``: F = 64, L = 3 x 8), the plain
      path (``kernel=torch``) against the kernel (``kernel=cuda``, only where mamba-ssm is importable
      on a GPU): max abs difference of the output and of the input gradient (goal <= 1e-4) and the
      time ratio.
    * ``step``: a MambaPro training step (CLIP tower frozen, prompts + adapters, ``mamba`` fusion,
      plain scan) against the same model with the ``concat`` fusion: the aggregation's share.
    """
    from .models.mamba import _cuda_scan, selective_scan

    dev = torch.device(device)
    modalities = ("rgb", "nir", "tir")
    width = 64 if tiny else 512
    length = 3 * (8 if tiny else 128)
    di, n = 2 * width, 16
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    u = rand(batch, di, length).requires_grad_()
    delta, Bm, Cm = rand(batch, di, length, scale=0.1), rand(batch, n, length), rand(batch, n, length)
    A = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1)).to(dev)
    D, bias = torch.ones(di, device=dev), torch.zeros(di, device=dev)
    have_kernel = dev.type == "cuda" and _cuda_scan() is not None

    def scan(kernel):
        def fn():
            u.grad = None
            y = selective_scan(u, delta, A, Bm, Cm, D, delta_bias=bias, delta_softplus=True, kernel=kernel)
            y.square().sum().backward()
            return y.detach(), u.grad.detach()
        return fn

    fns = {"scan_torch": scan("torch")}
    diffs: Dict[str, float] = {}
    if have_kernel:
        fns["scan_cuda"] = scan("cuda")
        (y0, g0), (y1, g1) = fns["scan_torch"](), fns["scan_cuda"]()
        diffs["scan output (cuda kernel vs plain)"] = float((y1 - y0).abs().max())
        diffs["scan input gradient (cuda kernel vs plain)"] = float((g1 - g0).abs().max())
    pairs = [("scan_torch", "scan_cuda")] if have_kernel else [("scan_torch", "scan_torch")]
    scan_result = compare_pairs(fns, pairs, reps, warmup, dev)
    base = {"backbone": "clip", "freeze_backbone": True, "multi_scale": {"enabled": False},
            "prompts": {"enabled": True}, "adapters": {"enabled": True}}
    step_fns, params = {}, {}
    for fusion in ("mamba", "concat"):
        kwargs = {"modality_fusion_kwargs": {"kernel": "torch"}} if fusion == "mamba" else {}
        cfg = bench_config({**base, "modality_fusion": fusion, **kwargs}, tiny, modalities, batch)
        model, step = build_step(cfg, batch // 2, dev)
        data = fake_batch(cfg, dev)
        step_fns[fusion] = lambda step=step, b=data: step(b)
        params[f"trainable_m ({fusion})"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        if fusion == "mamba":
            params["aggregation_m"] = sum(p.numel() for p in model.modality_fusion.parameters()) / 1e6
    steps = compare_pairs(step_fns, [("mamba", "concat")], reps, warmup, dev)
    return {"name": "mamba", "goal": "mamba-ssm's kernel equal to the plain scan within 1e-4; the aggregation's "
                                     "share of a MambaPro step",
            "method": PAIR_METHOD, "setting": {**_setting(tiny, batch, modalities, reps, warmup),
                                               "scan": f"Di={di}, L={length}, state={n}, forward + backward",
                                               "kernel": "mamba-ssm" if have_kernel else
                                               "not available here (needs mamba-ssm on a CUDA device): plain "
                                               "path only, the A/A row is the noise control"},
            "environment": environment(dev), **_merge(scan_result, steps), "max_abs_diff": diffs,
            "figures": {"params": params}}


@BENCHMARKS.register("data")
def bench_data(batch: int = 32, reps: int = 3, warmup: int = 1, tiny: bool = False, device: str = "cpu",
               workers: Sequence[int] = (0, 2)) -> Dict:
    """Images per second of the training loader (decode + augment) against what the model consumes.

    The loader reads a synthetic RGBNT201-layout set of 256x128 jpgs (rgb, nir, tir; ``tiny``: 64x32)
    with the peers' augmentation (flip, pad 10 + crop, random erasing), PK-sampled, without the
    decoded-image cache, with 0 (in process) and 2 worker processes. The model figure is the
    hybrid ViT-B/16 training step (``bench hybrid``'s ``hybrid``) on the same device and batch.
    """
    dev = torch.device(device)
    modalities = ("rgb", "nir", "tir")
    size = (64, 32) if tiny else (256, 128)
    rates, samples = _loader_rate(batch, reps, warmup, tiny, workers)
    figures: Dict[str, Dict] = {"loader_images_per_s": rates, "model_images_per_s": {}}
    # the model's rate from a smaller batch on a CPU (a ViT-B/16 step on 96 images takes a minute there)
    model_batch = batch if dev.type == "cuda" else 4
    cfg = bench_config({"backbone": "hybrid", "fusion": "concat"}, tiny, modalities, model_batch)
    model, step = build_step(cfg, model_batch // 2, dev)
    b = fake_batch(cfg, dev)
    t = time_interleaved({"hybrid": lambda: step(b)}, reps, warmup, dev)["hybrid"]
    figures["model_images_per_s"][f"hybrid train step (batch {model_batch})"] = \
        model_batch * len(modalities) / statistics.median(t)
    best = max(figures["loader_images_per_s"].values())
    figures["headroom"] = {"best loader / model": best / max(figures["model_images_per_s"].values())}
    return {"name": "data", "goal": "the loader is not the bottleneck (loader images/s > model images/s)",
            "method": "loader: images delivered per second over whole epochs after a warm-up epoch; model: "
                      "median training step", "setting": {**_setting(tiny, batch, modalities, reps, warmup),
                                                          "images": f"{size[0]}x{size[1]} jpg, "
                                                          f"{samples} training samples"},
            "environment": environment(dev), "median_s": {}, "ratios": {}, "iqr": {}, "figures": figures}


class NoDeviceError(RuntimeError):
    """The benchmark needs a device this machine does not have."""


@BENCHMARKS.register("gpu")
def bench_gpu(batch: int = 64, reps: int = 10, warmup: int = 3, tiny: bool = False, device: str = "cuda",
              peak_tflops: Optional[float] = None, workers: Sequence[int] = (8,),
              backbones: Sequence[str] = ("clip", "vit", "hybrid"),
              progress: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Training throughput on one GPU: images/s, peak memory and MFU, eager and compiled, plus the loader.

    For each of ``clip``, ``vit`` and ``hybrid`` (ViT-B/16 at 256x128, random init, rgb + nir + tir,
    P x K batch of ``batch`` samples, bf16 autocast, fused AdamW, ID + triplet losses), with
    ``torch.compile`` off and on: median step time -> images/s, peak allocated memory, FLOPs per step
    (FlopCounterMode on the eager step: matmuls, convolutions, attention) and model FLOPs utilisation
    against the device's dense bf16 peak (:data:`PEAK_BF16`, or ``peak_tflops``). Compilation happens in
    the warm-up rounds. ``train.deterministic``'s cost: the eager step with its switches on, timed
    interleaved with the plain one (``<backbone>+deterministic``). The loader figure is the training
    loader (decode + augment, no cache) with ``workers`` processes on a synthetic 256x128 set.
    ``tiny`` runs the same code on the tiny towers (64x32; on a CPU with ``device="cpu"``: the
    quickstart's step, eager against compiled).
    ``progress`` receives the result so far after every candidate (``run_benchmark`` writes it, so
    a run cut short keeps what it measured, marked ``"partial": true``).
    """
    dev = torch.device(device)
    if dev.type == "cuda":  # as train.deterministic sets it; cuBLAS reads it once, at its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NoDeviceError("bench gpu: no GPU on this machine (torch.cuda.is_available() is False); run it on a "
                            "GPU machine, or pass --device cpu --tiny for a smoke run of the same code")
    modalities = ("rgb", "nir", "tir")
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dev)
    fns, figures = {}, {"images_per_s": {}, "peak_memory_gib": {}, "tflops_per_step": {}, "mfu": {},
                        "median_step_s": {}}
    flops: Dict[str, float] = {}
    for backbone in backbones:
        spec = {"backbone": backbone, "fusion": "concat"}
        cfg = bench_config(spec, tiny, modalities, batch)
        data = fake_batch(cfg, dev)
        for compiled in (False, True):
            name = f"{backbone}{'+compile' if compiled else ''}"
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _, step = build_step(cfg, batch // 2, dev, compile=compiled)
            fns[name] = lambda step=step, b=data: step(b)
            if not compiled:
                flops[backbone] = step_flops(fns[name])
                # train.deterministic's cost: the same eager step with the deterministic switches, interleaved
                det = time_interleaved({name: fns[name], "det": lambda fn=fns[name]: _deterministic_call(fn)},
                                       reps, 1, dev)["det"]
                figures["images_per_s"][f"{backbone}+deterministic"] = batch * len(modalities) / statistics.median(det)
                figures["median_step_s"][f"{backbone}+deterministic"] = statistics.median(det)
            times = time_interleaved({name: fns[name]}, reps, warmup, dev)[name]
            t = statistics.median(times)
            figures["images_per_s"][name] = batch * len(modalities) / t
            figures["tflops_per_step"][name] = flops[backbone] / 1e12
            if dev.type == "cuda":
                figures["peak_memory_gib"][name] = torch.cuda.max_memory_allocated(dev) / 2**30
            if peak:
                figures["mfu"][name] = flops[backbone] / t / peak
            figures["median_step_s"][name] = t
            if progress:
                progress(_gpu_result(figures, backbones, tiny, batch, modalities, reps, warmup, dev, peak, True))
    figures["loader_images_per_s"] = _loader_rate(batch, reps=2, warmup=1, tiny=tiny, workers=workers)[0]
    return _gpu_result(figures, backbones, tiny, batch, modalities, reps, warmup, dev, peak, False)


def _deterministic_call(fn: Callable[[], object]) -> object:
    """``fn()`` under ``train.deterministic``'s switches, restored afterwards."""
    from .engine.train import DETERMINISTIC_SWITCHES, set_determinism_switches

    saved = set_determinism_switches(DETERMINISTIC_SWITCHES)
    try:
        return fn()
    finally:
        set_determinism_switches(saved)


def _gpu_result(figures: Dict[str, Dict], backbones: Sequence[str], tiny: bool, batch: int, modalities: Sequence[str],
                reps: int, warmup: int, dev: torch.device, peak: Optional[float], partial: bool) -> Dict:
    steps = figures.get("median_step_s", {})
    ratios = {f"{b}{v} / {b}": steps[f"{b}{v}"] / steps[b] for b in backbones for v in ("+compile", "+deterministic")
              if f"{b}{v}" in steps and b in steps}
    figures = {k: dict(v) for k, v in figures.items() if v}
    head = {"name": "gpu", **({"partial": True} if partial else {})}
    return {**head, "goal": "images/s, peak memory and MFU of a training step, eager and compiled; the loader keeps up",
            "method": "each candidate timed alone after its warm-up (compilation included there); median over rounds",
            "setting": {**_setting(tiny, batch, modalities, reps, warmup), "precision": "bf16 autocast" if
                        dev.type == "cuda" else "fp32", "peak_bf16_tflops": peak / 1e12 if peak else None},
            "environment": environment(dev), "median_s": {}, "ratios": ratios, "iqr": {}, "figures": figures}


def _loader_rate(batch: int, reps: int, warmup: int, tiny: bool,
                 workers: Sequence[int]) -> Tuple[Dict[str, float], int]:
    """Images per second the training loader delivers (rgb + nir + tir jpgs of a synthetic set, no cache,
    the peers' augmentation, PK-sampled) per worker count, and the number of training samples."""
    import tempfile as _tempfile

    from .config import DataConfig
    from .data import PairedTransform, build_train_loader, load_data
    from .data.synth import SynthSpec, generate

    modalities = ("rgb", "nir", "tir")
    size = (64, 32) if tiny else (256, 128)
    out = {}
    with _tempfile.TemporaryDirectory() as root:
        generate(root, SynthSpec(ids=40, cams=4, images_per_cam=4, seed=0, size=size))
        data = load_data(DataConfig(name="rgbnt201", root=root, modalities=list(modalities)))
        transform = PairedTransform(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
        batch = min(batch, 4 * data.num_train_pids)
        for n in workers:
            loader = build_train_loader(data.train, modalities, transform, batch, 4, 0, n)
            for _ in range(warmup):
                for _b in loader:
                    pass
            seen, t0 = 0, time.perf_counter()
            for _ in range(reps):
                for b in loader:
                    seen += sum(b["images"][m].shape[0] for m in modalities)
            out[f"workers={n}"] = seen / (time.perf_counter() - t0)
        return out, len(data.train)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def to_markdown(result: Dict) -> str:
    lines = [f"# Benchmark: {result['name']}", ""]
    if result.get("partial"):
        lines += ["**Partial: the run stopped before every candidate was measured.**", ""]
    lines += [f"Goal: {result.get('goal', '-')}", "",
             "Setting: " + ", ".join(f"{k}={v}" for k, v in result["setting"].items()),
             "Environment: " + ", ".join(f"{k}={v}" for k, v in result["environment"].items()), "",
             f"Method: {result['method']}", ""]
    if result["ratios"]:
        if result["median_s"]:
            lines += ["| a / b | a median (ms) | b median (ms) | ratio (median) | ratio (iqr) |",
                      "|---|---:|---:|---:|---:|"]
            for k, v in result["ratios"].items():
                m, q = result["median_s"][k], result["iqr"][k]
                lines.append(f"| {k} | {m['a'] * 1e3:.1f} | {m['b'] * 1e3:.1f} | {v:.3f} | {q[0]:.3f}-{q[1]:.3f} |")
        else:
            lines += ["| a / b | ratio (median step) |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    if result.get("max_abs_diff"):
        lines += ["", "| check | max abs diff |", "|---|---:|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in result["max_abs_diff"].items()]
    for group, values in (result.get("figures") or {}).items():
        lines += ["", f"| {group} | value |", "|---|---:|"]
        for k, v in values.items():
            if isinstance(v, dict):
                lines += [f"| {k}: {k2} | {_fmt(v2)} |" for k2, v2 in v.items()]
            else:
                lines.append(f"| {k} | {_fmt(v)} |")
    return "\n".join(lines) + "\n"


def run_benchmark(name: str, out_dir: Optional[str] = "experiments/benchmarks", **kwargs) -> Dict:
    """Run one registered benchmark and write ``<out_dir>/<name>.json`` and ``.md``.

    ``kwargs`` a benchmark does not take are ignored (so ``bench all --tiny`` reaches every one).
    """
    import inspect

    fn = BENCHMARKS.get(name)
    accepted = inspect.signature(fn).parameters
    if out_dir and "progress" in accepted:
        kwargs["progress"] = lambda partial: _write_result(out_dir, name, partial)
    result = fn(**{k: v for k, v in kwargs.items() if k in accepted})
    if out_dir:
        _write_result(out_dir, name, result)
    return result


def _write_result(out_dir: str, name: str, result: Dict) -> None:
    write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(result, indent=2) + "\n")
    write_atomic(os.path.join(out_dir, f"{name}.md"), to_markdown(result))
