"""Command line of ``run.py`` (also through ``accelerate launch run.py ...`` and ``torchrun ... run.py ...``).

    python run.py train --config configs/quickstart.yaml [--resume [PATH]] [train.epochs=10 ...]
    python run.py eval  --config configs/quickstart.yaml --checkpoint outputs/quickstart/model.safetensors \
                        [--save-features feats.safetensors]
    python run.py extract --config outputs/quickstart/config.yaml --checkpoint outputs/quickstart/model.safetensors \
                          --images DIR [--modality nir] [--out features.safetensors]
    python run.py visualize --config configs/quickstart.yaml --checkpoint outputs/quickstart/model.safetensors
    python run.py synth --out data/synthetic [--ids 100 --cams 4 --seed 0]
    python run.py info  --config configs/hybrid.yaml [--json] [model.fusion=gated ...]
    python run.py sweep experiments/backbone_ablation-tiny.yaml [--dry-run]
    python run.py bench {eval,backbone,hybrid,mer,data,gpu,all} [--tiny --device cuda]
    python run.py convert-weights weights/ViT-B-16.pt weights/ViT-B-16.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from .config import ConfigError, load_config
from .data import DataError, canonical_modality
from .data.synth import LAYOUTS
from .models import CheckpointError, build_model, parameter_summary
from .models.model import group_learning_rates
from .utils import MissingPackageError


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    modalities = [canonical_modality(m) for m in cfg.data.modalities]
    model = build_model(cfg.model, load_pretrained=False, modalities=modalities)
    summary = parameter_summary(model)
    groups = model.param_groups()
    lrs = group_learning_rates(list(groups), cfg.optim.lr, cfg.optim.group_lr)
    summary["param_groups"] = {g: {"params": sum(p.numel() for _, p in ps), "lr": lrs[g]} for g, ps in groups.items()}
    towers = cfg.model.towers
    fusion = cfg.model.fusion if len(towers) > 1 else None
    summary["towers"] = {t: {"arch": s.arch, "stride": s.stride, "family": model.encoder.backbones[t].family.name,
                             "global": model.encoder.backbones[t].pool, "grid": summary["grid"][t]}
                         for t, s in towers.items()}
    if args.json:
        summary["backbone"] = cfg.model.label
        summary["fusion"] = fusion
        summary["feat_dim"] = cfg.model.feat_dim
        summary["modalities"] = modalities
        summary["modality_fusion"] = cfg.model.modality_fusion
        print(json.dumps(summary, indent=2))
        return 0
    comps = summary["components"]
    total = summary["total"]
    width = max(len(k) for k in comps) + 2
    print(f"towers: {', '.join(towers)} (backbone {cfg.model.label})" + (f"  fusion: {fusion}" if fusion else "")
          + f"  feat_dim: {cfg.model.feat_dim}  img_size: {list(cfg.model.img_size)}")
    print(f"modalities: {modalities}  modality_fusion: {cfg.model.modality_fusion} "
          f"(head width {model.modality_fusion.out_dim})")
    print(f"{'component':<{width}}{'params':>14}{'trainable':>14}{'share':>9}")
    for name, c in comps.items():
        share = 100.0 * c["params"] / max(1, total)
        print(f"{name:<{width}}{_fmt_int(c['params']):>14}{_fmt_int(c['trainable']):>14}{share:>8.2f}%")
    print(f"{'total':<{width}}{_fmt_int(total):>14}{_fmt_int(summary['trainable']):>14}")
    print(f"frozen: {_fmt_int(summary['frozen'])}")
    for t, info in summary["towers"].items():
        g = info["grid"]
        print(f"grid[{t}]: {g[0]}x{g[1]} (arch {info['arch']}, stride {info['stride'] or 'patch'}, family "
              f"{info['family']}, global token {info['global']})")
    print("lr groups: " + "  ".join(f"{g} {v['lr']:g} ({_fmt_int(v['params'])})"
                                    for g, v in summary["param_groups"].items()))
    if cfg.model.multi_scale.enabled:
        for t, s in summary["multi_scale_share"].items():
            print(f"multi_scale[{t}]: {100 * s:.2f}% of the {t} tower's parameters")
    return 0


def _split_resume(args: argparse.Namespace) -> None:
    """``--resume key=value`` means ``--resume`` (latest) followed by an override."""
    if args.resume and args.resume != "latest" and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = "latest"


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    _split_resume(args)
    cfg = load_config(args.config, args.overrides)
    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change only applies with --resume")
    train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .models.checkpoint import read_state_dict
    from .utils import atomic_path

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"convert-weights writes safetensors: name the output *.safetensors, not {args.out}")
    sd = read_state_dict(args.input)  # TorchScript via torch.jit.load; pickles weights-only
    if args.from_:
        from .methods import LAYOUTS

        try:
            layout = LAYOUTS.get(args.from_)
        except KeyError as e:
            raise ValueError(f"--from: {e.args[0]}") from None
        plain = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        if not layout.detect(plain):
            raise ValueError(f"{args.input} is not a {args.from_} checkpoint ({layout.description}); its first keys: "
                             f"{list(sd)[:5]}")
        try:
            converted = layout.convert(plain)
        except KeyError as e:
            raise ValueError(f"{args.input} looks like a {args.from_} checkpoint, but key {e.args[0]!r} has no "
                             "place in this project's layout (a modified model?)") from None
        with atomic_path(args.out) as tmp:
            save_file({k: v.contiguous() for k, v in converted.state.items()}, tmp)
        print(f"wrote {args.out}: {len(converted.state)} tensors in this project's layout from {args.from_}'s "
              f"{args.input}; {len(converted.unused)} of its keys have no place here"
              + (f" ({', '.join(converted.unused[:6])}{' ...' if len(converted.unused) > 6 else ''})"
                 if converted.unused else "")
              + f". Evaluate it with run.py eval --config configs/methods/{args.from_}.yaml --checkpoint {args.out}")
        return 0
    with atomic_path(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    size = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {size / 2**20:.1f} MiB from {args.input}; point the config at it, "
          f"e.g. model.clip.pretrained={args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate

    if args.features:
        from .engine.train import evaluate_saved

        if args.checkpoint or args.save_features:
            raise ValueError("--features evaluates saved features: leave out --checkpoint and --save-features")
        evaluate_saved(args.features, args.overrides, config=args.config, out=args.out)
        return 0
    if not args.config or not args.checkpoint:
        raise ValueError("run.py eval needs --config and --checkpoint (or --features FILE for saved features)")
    cfg = load_config(args.config, args.overrides)
    evaluate(cfg, args.checkpoint, save_features_to=args.save_features, out=args.out)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .engine.extract import extract_folder

    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join(cfg.output_dir, "features.safetensors")
    r = extract_folder(cfg, args.checkpoint, args.images, out, modality=args.modality, cam=args.cam)
    print(f"{r['num_images']} samples ({'+'.join(r['modalities'])}) -> {r['dim']}-d features in {r['out']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    report = export_model(args.model, args.format, out_dir=args.out, combinations=args.modalities)
    for name, r in report.items():
        print(f"{r['path']}: inputs {', '.join(r['inputs'])} -> feat [batch, {r['output_dim']}] "
              f"(L2-normalised); max |diff| against eager {r['max_abs_diff']:.2e}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize

    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join(cfg.output_dir, "visualize")
    written = visualize(cfg, args.checkpoint, out, num_queries=args.queries, topk=args.topk, max_sets=args.max_sets)
    for kind, paths in written.items():
        for path in paths:
            print(f"{kind}: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    launcher = args.launcher.split() if args.launcher else ()
    r = run_sweep(args.suite, args.overrides, dry_run=args.dry_run, launcher=launcher)
    for item in r["runs"]:
        print(f"{item['state']:>6}  {item['variant']}  seed {item['seed']}  -> {item['output_dir']}")
        if args.dry_run and args.verbose:
            print("        " + " ".join(item["command"]))
    if r["results"]:
        with open(r["results"]) as f:
            print(f.read())
        print(f"results: {r['results']} (+ results.csv, results.png)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import SynthSpec, generate

    spec = SynthSpec(ids=args.ids, cams=args.cams, images_per_cam=args.images_per_cam,
                     test_fraction=args.test_fraction, seed=args.seed, size=(args.height, args.width))
    path = generate(args.out, spec, overwrite=args.force, layout=args.layout)
    extra = {"market1501": " data.modalities=[rgb]", "msmt17": " data.modalities=[rgb]",
             "veri776": " data.modalities=[rgb]", "msvr310": " eval.protocol=msvr310",
             "orbench": " data.modalities=[rgb,nir,cpencil,sketch,text] model.modality_fusion=mean "
                        "eval.protocol=orbench"}.get(args.layout, "")
    root = path if args.layout in ("folder", "manifest") else args.out  # your own data: data.root is the set itself
    print(f"wrote {path} ({spec.ids - spec.num_test} train / {spec.num_test} test identities, {spec.cams} cameras, "
          f"{spec.images_per_cam} images per identity and camera); use it with data.name={args.layout} "
          f"data.root={root}{extra}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BENCHMARKS, NoDeviceError, run_benchmark, to_markdown

    keys = ("batch", "reps", "warmup", "tiny", "device", "queries", "gallery", "backbone", "peak_tflops", "workers",
            "backbones")
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.skip_msmt17:
        options["msmt17"] = False
    # ``all`` is what a CPU machine can run; ``gpu`` is asked for by name
    names = [n for n in BENCHMARKS.names() if n != "gpu"] if args.name == "all" else [args.name]
    for name in names:
        try:
            print(to_markdown(run_benchmark(name, out_dir=args.out, **options)), flush=True)
        except NoDeviceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def _trained_model_args(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config`` and ``--checkpoint``: the commands that load a trained model (eval, extract, visualize)."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/model.safetensors or a checkpoint folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="hybrid_reid: multi-modal ReID with CLIP and ViT")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train and evaluate; outputs in output_dir")
    tr.add_argument("--config", required=True, help="YAML config")
    tr.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                    help="continue from OUTPUT_DIR/checkpoints' newest checkpoint, or from PATH")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue although the config differs from the run's config.yaml in keys "
                         "that affect training (logged)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=10 data.root=/datasets")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained model, or saved features; writes OUTPUT_DIR/eval_metrics.json")
    ev.add_argument("--config", default=None, help="the YAML config the model was trained with (with --features: "
                                                   "optional, its eval.* settings replace the saved ones)")
    ev.add_argument("--checkpoint", default=None, help="OUTPUT_DIR/model.safetensors, a checkpoint folder, or a "
                                                       "model saved by a published method's code")
    ev.add_argument("--features", default=None, metavar="FILE",
                    help="evaluate features saved with --save-features instead of a model: no model, no images, "
                         "the same numbers (writes FILE's name + .metrics.json unless --out)")
    ev.add_argument("--save-features", default=None, metavar="FILE",
                    help="also write the query / gallery features, pids, camids and paths (.safetensors or .npz)")
    ev.add_argument("--out", default=None, metavar="FILE",
                    help="the metrics file to write (default OUTPUT_DIR/eval_metrics.json; never a run's metrics.json)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("extract", help="embed a folder of images with a trained model")
    _trained_model_args(ex, "the run's OUTPUT_DIR/config.yaml (or its training config)")
    ex.add_argument("--images", required=True,
                    help="a folder of images (searched recursively), or one with modality sub-folders (RGB/ NI/ TI/, "
                         "vis/ nir/ ...) paired by file name")
    ex.add_argument("--modality", default=None, help="the modality of a plain folder's images (default: the "
                                                     "model's first)")
    ex.add_argument("--cam", type=int, default=0, help="camera id given to the camera embedding (default 0)")
    ex.add_argument("--out", default=None, help="output .safetensors / .npz (default OUTPUT_DIR/features.safetensors)")
    ex.add_argument("overrides", nargs="*", help="dotted overrides")
    ex.set_defaults(func=cmd_extract)

    xp = sub.add_parser("export", help="a model folder as ONNX or TorchScript graphs, checked against eager")
    xp.add_argument("model", help="a model folder or a finished run's output_dir (model.safetensors + config.yaml)")
    xp.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    xp.add_argument("--modalities", nargs="+", default=None, metavar="COMBINATION",
                    help="one graph per combination, e.g. rgb+nir+tir rgb (default: all the model's modalities)")
    xp.add_argument("--out", default=None, help="output folder (default MODEL/export)")
    xp.set_defaults(func=cmd_export)
    vi = sub.add_parser("visualize", help="CMC curve, rank lists and t-SNE PNGs of a trained model")
    _trained_model_args(vi, "the YAML config the model was trained with")
    vi.add_argument("--out", default=None, help="output folder (default OUTPUT_DIR/visualize)")
    vi.add_argument("--queries", type=int, default=6, help="queries per rank list (evenly spread)")
    vi.add_argument("--topk", type=int, default=10, help="gallery items per query")
    vi.add_argument("--max-sets", type=int, default=4, help="rank lists for at most this many query sets")
    vi.add_argument("overrides", nargs="*", help="dotted overrides")
    vi.set_defaults(func=cmd_visualize)

    sw = sub.add_parser("sweep", help="run an experiment suite (variants x seeds), then tabulate and plot it")
    sw.add_argument("suite", help="a suite YAML, e.g. experiments/backbone_ablation-tiny.yaml")
    sw.add_argument("--dry-run", action="store_true", help="list the runs (done / resume / todo) and stop")
    sw.add_argument("--verbose", action="store_true", help="with --dry-run: print each run's command")
    sw.add_argument("--launcher", default=None,
                    help="command that starts a run instead of 'python -m hybrid_reid.cli', e.g. "
                         "'accelerate launch --num_processes 4 -m hybrid_reid.cli'")
    sw.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    sw.set_defaults(func=cmd_sweep)

    sy = sub.add_parser("synth", help="write the synthetic data set in a release's layout")
    sy.add_argument("--out", required=True, help="folder that will contain RGBNT201/ (or the --layout's folder); "
                                                 "the data.root to use")
    sy.add_argument("--ids", type=int, default=100, help="identities (train + test)")
    sy.add_argument("--cams", type=int, default=4, help="cameras (2..9)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--images-per-cam", type=int, default=3, help="images per identity and camera")
    sy.add_argument("--test-fraction", type=float, default=0.3, help="share of identities in the test split")
    sy.add_argument("--height", type=int, default=128)
    sy.add_argument("--width", type=int, default=64)
    sy.add_argument("--layout", default="rgbnt201", choices=list(LAYOUTS),
                    help="the release layout to write (rgbnt201: RGB+NIR+TIR+captions; market1501, msmt17, "
                         "veri776: RGB; rgbnt100: RGB|NI|TI in one jpg; msvr310: vis/ni/th with scenes; orbench: "
                         "vis/nir/cp/sk + captions and query sets; folder: <split>/<modality>/<pid>/ folders; "
                         "manifest: images + manifest.csv)")
    sy.add_argument("--force", action="store_true", help="replace an existing set")
    sy.set_defaults(func=cmd_synth)

    info = sub.add_parser("info", help="parameters per component and patch grids (no weights loaded)")
    info.add_argument("--config", required=True, help="YAML config")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.backbone=hybrid")
    info.set_defaults(func=cmd_info)

    cw = sub.add_parser("convert-weights", help="a pretrained file (OpenAI TorchScript, torch pickle), or a model "
                                                "trained with a published method's code, -> safetensors")
    cw.add_argument("--from", dest="from_", default=None, metavar="METHOD",
                    help="the input is a model saved by that method's own code (mambapro, ...): rename it into "
                         "this project's layout")
    cw.add_argument("input", help="e.g. weights/ViT-B-16.pt (OpenAI's TorchScript archive)")
    cw.add_argument("out", help="e.g. weights/ViT-B-16.safetensors")
    cw.set_defaults(func=cmd_convert_weights)
    bench = sub.add_parser("bench", help="benchmarks; results under experiments/benchmarks/")
    bench.add_argument("name", choices=["eval", "backbone", "hybrid", "mer", "data", "mamba", "gpu", "all"],
                       help="all = every benchmark but gpu (which needs a GPU, or --device cpu --tiny)")
    bench.add_argument("--out", default="experiments/benchmarks", help="output folder ('' = do not write)")
    bench.add_argument("--batch", type=int, default=None,
                       help="images per modality and step (backbone 8, hybrid/mer 4, data 32)")
    bench.add_argument("--reps", type=int, default=None, help="timed rounds")
    bench.add_argument("--warmup", type=int, default=None)
    bench.add_argument("--queries", type=int, default=None, help="eval: queries of the small size (1000)")
    bench.add_argument("--gallery", type=int, default=None, help="eval: gallery of the small size (15000)")
    bench.add_argument("--skip-msmt17", action="store_true", help="eval: leave out the MSMT17-size run")
    bench.add_argument("--backbone", default=None, choices=["clip", "vit", "hybrid"], help="mer: the tower (clip)")
    bench.add_argument("--tiny", action="store_true", help="tiny towers and sizes (a smoke run)")
    bench.add_argument("--device", default=None, help="cpu (default; gpu: cuda) or cuda")
    bench.add_argument("--peak-tflops", type=float, default=None,
                       help="gpu: the device's dense bf16 peak in TFLOP/s for MFU (default: looked up by GPU name)")
    bench.add_argument("--backbones", nargs="+", default=None, choices=["clip", "vit", "hybrid"],
                       help="gpu: the models to measure (default all three)")
    bench.add_argument("--workers", type=int, nargs="+", default=None,
                       help="gpu / data: loader worker counts to measure (gpu: 8; data: 0 2)")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    rank = int(os.environ.get("RANK", "0"))  # torchrun / accelerate launch: only rank 0 logs progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages
    args = build_parser().parse_args(argv)
    from .engine.state import OutputDirNotEmptyError, RunLockedError
    from .engine.train import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, DataError, ValueError, KeyError, FileNotFoundError, FileExistsError,
            RunLockedError, OutputDirNotEmptyError, MissingPackageError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
