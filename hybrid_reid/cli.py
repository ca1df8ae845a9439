"""Command line of ``run.py``: ``info`` and ``bench`` (training and evaluation arrive with the engine).

    python run.py info --config configs/hybrid.yaml [--json] [model.fusion=gated ...]
    python run.py bench backbone [--batch 8 --reps 10]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from .config import ConfigError, load_config
from .models import CheckpointError, build_model, parameter_summary


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, load_pretrained=False)
    summary = parameter_summary(model)
    if args.json:
        summary["backbone"] = cfg.model.backbone
        summary["fusion"] = cfg.model.fusion if len(cfg.model.towers) > 1 else None
        summary["feat_dim"] = cfg.model.feat_dim
        print(json.dumps(summary, indent=2))
        return 0
    comps = summary["components"]
    total = summary["total"]
    width = max(len(k) for k in comps) + 2
    print(f"backbone: {cfg.model.backbone}"
          + (f"  fusion: {cfg.model.fusion}" if len(cfg.model.towers) > 1 else "")
          + f"  feat_dim: {cfg.model.feat_dim}  img_size: {list(cfg.model.img_size)}")
    print(f"{'component':<{width}}{'params':>14}{'trainable':>14}{'share':>9}")
    for name, c in comps.items():
        share = 100.0 * c["params"] / max(1, total)
        print(f"{name:<{width}}{_fmt_int(c['params']):>14}{_fmt_int(c['trainable']):>14}{share:>8.2f}%")
    print(f"{'total':<{width}}{_fmt_int(total):>14}{_fmt_int(summary['trainable']):>14}")
    print(f"frozen: {_fmt_int(summary['frozen'])}")
    for t, g in summary["grid"].items():
        tc = getattr(cfg.model, t)
        print(f"grid[{t}]: {g[0]}x{g[1]} (arch {tc.arch}, stride {tc.stride or 'patch'})")
    if cfg.model.multi_scale.enabled:
        for t, s in summary["multi_scale_share"].items():
            print(f"multi_scale[{t}]: {100 * s:.2f}% of the {t} tower's parameters")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark, to_markdown

    result = run_benchmark(args.name, out_dir=args.out, batch=args.batch, reps=args.reps,
                           warmup=args.warmup, tiny=args.tiny, device=args.device)
    print(to_markdown(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="hybrid_reid: multi-modal ReID with CLIP and ViT")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters per component and patch grids (no weights loaded)")
    info.add_argument("--config", required=True, help="YAML config")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.backbone=hybrid")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks; results under experiments/benchmarks/")
    bench.add_argument("name", choices=["backbone"])
    bench.add_argument("--out", default="experiments/benchmarks", help="output folder ('' = do not write)")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--reps", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--tiny", action="store_true", help="tiny towers (smoke test)")
    bench.add_argument("--device", default="cpu")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
