"""Experiment suites (``run.py sweep``): a base config, named variants of dotted overrides, seeds.

A suite is a YAML file::

    base: ../configs/quickstart.yaml        # relative to the suite file
    overrides: [train.epochs=15]            # for every run (optional)
    seeds: [0, 1]                           # optional; default: the base config's seed
    output_dir: outputs/sweeps/backbone     # where every run and the results go
    variants:                               # name -> dotted overrides (a list or a mapping)
      clip: [model.backbone=clip]
      clip+ms: {model.backbone: clip, model.multi_scale.enabled: true}
      mambapro: {_base_: ../configs/methods/mambapro.yaml}   # a variant on another config

A mapping variant may name its own ``_base_`` config (relative to the suite file): a method compared
with its authors' recipe, the suite's ``overrides``, ``extra`` and seeds applied to it as to the rest.

Every (variant, seed) trains in its own process into ``OUTPUT_DIR/<variant>/seed<k>/``. A run whose
``metrics.json`` exists is skipped and one with checkpoints but no ``metrics.json`` is resumed, so
an interrupted sweep continues where it stopped. At the end the sweep writes
``OUTPUT_DIR/results.csv`` (a row per run), ``results.md`` (mean ± std over seeds per variant) and
``results.png`` (mAP, R1 and mINP per variant).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import yaml

from .config import ConfigError, from_dict, load_config
from .utils import atomic_path, write_atomic

logger = logging.getLogger(__name__)

COLUMNS = ("mAP", "rank1", "mINP", "params", "train_time_s")


@dataclass
class Suite:
    """A parsed suite file (unknown keys are an error)."""

    base: str
    variants: Dict[str, Union[List[str], Dict[str, Any]]]
    output_dir: str
    overrides: List[str] = field(default_factory=list)
    seeds: Optional[List[int]] = None
    description: str = ""


@dataclass
class Run:
    variant: str
    seed: int
    overrides: List[str]
    output_dir: str
    base: str = ""  # the config the run starts from (the suite's base, or the variant's _base_)

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.output_dir, "metrics.json"))

    @property
    def resumable(self) -> bool:
        ckpt = os.path.join(self.output_dir, "checkpoints")
        return not self.done and os.path.isdir(ckpt) and any(n.startswith("epoch_") for n in os.listdir(ckpt))


def _as_overrides(variant: str, spec: Union[List[str], Dict[str, Any], None]) -> List[str]:
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in spec.items()]
    if isinstance(spec, list) and all(isinstance(x, str) and "=" in x for x in spec):
        return list(spec)
    raise ConfigError(f"variants.{variant}: expected a list of key=value overrides or a mapping, got {spec!r}")


def load_suite(path: str, extra: Sequence[str] = ()) -> tuple:
    """``(suite, base config path, runs)``; every run's config is loaded (and so validated) now."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"suite {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"suite {path}: not valid YAML: {e}") from None
    suite = from_dict(Suite, raw, "suite")
    if not suite.variants:
        raise ConfigError(f"suite {path}: no variants")
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), suite.base))
    base_cfg = load_config(base, [*suite.overrides, *extra])
    seeds = suite.seeds or [base_cfg.seed]
    runs = []
    for name, spec in suite.variants.items():
        if "/" in name or name.startswith("."):
            raise ConfigError(f"suite {path}: variant name {name!r} must be a plain folder name")
        run_base = base
        if isinstance(spec, dict) and "_base_" in spec:
            spec = dict(spec)
            run_base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), str(spec.pop("_base_"))))
            if not os.path.isfile(run_base):
                raise ConfigError(f"suite {path}, variant {name!r}: _base_ {run_base} does not exist")
        overrides = _as_overrides(name, spec)
        for seed in seeds:
            out = os.path.join(suite.output_dir, name, f"seed{seed}")
            args = [*suite.overrides, *overrides, *extra, f"seed={seed}", f"output_dir={out}"]
            try:
                load_config(run_base, args)
            except ConfigError as e:
                raise ConfigError(f"suite {path}, variant {name!r}: {e}") from None
            runs.append(Run(name, seed, args, out, run_base))
    return suite, base, runs


def run_sweep(path: str, extra: Sequence[str] = (), dry_run: bool = False, launcher: Sequence[str] = ()) -> Dict:
    """Run (or with ``dry_run`` list) every run of the suite at ``path``, then write the results.

    Args:
        extra: overrides added to every run (after the suite's).
        launcher: the command a run starts with (default: this Python running ``hybrid_reid.cli``;
            e.g. ``["accelerate", "launch", "--num_processes", "2", "-m", "hybrid_reid.cli"]``).

    Returns:
        ``{"runs": [...], "results": path or None}``.
    """
    suite, base, runs = load_suite(path, extra)
    cmd0 = list(launcher) or [sys.executable, "-m", "hybrid_reid.cli"]
    listing = []
    for r in runs:
        state = "done" if r.done else "resume" if r.resumable else "todo"
        listing.append({"variant": r.variant, "seed": r.seed, "state": state, "output_dir": r.output_dir,
                        "command": [*cmd0, "train", "--config", r.base, *r.overrides] + (
                            ["--resume"] if state == "resume" else [])})
    if dry_run:
        return {"runs": listing, "results": None}
    for item in listing:
        if item["state"] == "done":
            logger.info("sweep: %s seed %d already finished, skipped", item["variant"], item["seed"])
            continue
        logger.info("sweep: %s seed %d (%s)", item["variant"], item["seed"], item["state"])
        if item["state"] == "todo" and os.path.isdir(item["output_dir"]):
            # a run that died before its first checkpoint: nothing to resume, start it again
            logger.info("sweep: clearing %s (an earlier attempt without a checkpoint)", item["output_dir"])
            shutil.rmtree(item["output_dir"])
        proc = subprocess.run(item["command"])
        if proc.returncode != 0:
            raise RuntimeError(f"sweep: run {item['variant']} seed {item['seed']} failed (exit {proc.returncode}); "
                               f"its output is in {item['output_dir']}; fix it and run the sweep again to continue")
    rows = collect(runs)
    write_results(suite.output_dir, rows, title=suite.description or os.path.basename(path))
    return {"runs": listing, "results": os.path.join(suite.output_dir, "results.md")}


def collect(runs: Sequence[Run]) -> List[Dict[str, Any]]:
    """A row per finished run: variant, seed and :data:`COLUMNS` from its ``metrics.json``."""
    rows = []
    for r in runs:
        if not r.done:
            continue
        with open(os.path.join(r.output_dir, "metrics.json")) as f:
            m = json.load(f)
        rows.append({"variant": r.variant, "seed": r.seed, "mAP": m["mAP"], "rank1": m["rank1"], "mINP": m["mINP"],
                     "params": m.get("params"), "train_time_s": m.get("wall_time_s")})
    return rows


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, tuple]]:
    """``{variant: {column: (mean, std, n)}}`` over seeds, variants in first-seen order."""
    out: Dict[str, Dict[str, tuple]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        vs = [r for r in rows if r["variant"] == variant]
        out[variant] = {}
        for c in COLUMNS:
            vals = np.asarray([r[c] for r in vs if r[c] is not None], dtype=float)
            out[variant][c] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals)) \
                if len(vals) else (float("nan"), 0.0, 0)
    return out


def results_markdown(rows: Sequence[Dict[str, Any]], title: str = "") -> str:
    """Mean ± std over seeds per variant (std shown with two or more seeds)."""
    summary = summarize(rows)

    def fmt(c: str, v: tuple) -> str:
        mean, std, n = v
        if c == "params":
            return f"{mean / 1e6:.2f} M"
        if c == "train_time_s":
            return f"{mean:.0f} s"
        return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"

    seeds = max((v["mAP"][2] for v in summary.values()), default=0)
    lines = [f"### {title}" if title else "", f"{seeds} seed(s) per variant; mean ± std over seeds.", "",
             "| variant | mAP | R1 | mINP | params | train time |", "|---|---:|---:|---:|---:|---:|"]
    for variant, cols in summary.items():
        lines.append(f"| {variant} | " + " | ".join(fmt(c, cols[c]) for c in COLUMNS) + " |")
    return "\n".join(x for x in lines if x is not None).lstrip("\n") + "\n"


def plot_results(rows: Sequence[Dict[str, Any]], path: str, title: str = "") -> str:
    """Grouped bars of mAP, R1 and mINP per variant (error bars: std over seeds)."""
    from .visualize import _plt

    plt = _plt()
    summary = summarize(rows)
    names = list(summary)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4.2), dpi=120)
    for i, (c, label) in enumerate((("mAP", "mAP"), ("rank1", "R1"), ("mINP", "mINP"))):
        means = [summary[n][c][0] for n in names]
        stds = [summary[n][c][1] for n in names]
        bars = ax.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds if any(stds) else None, capsize=2, label=label)
        if c == "mAP":
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 105)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(out_dir: str, rows: Sequence[Dict[str, Any]], title: str = "") -> None:
    """``results.csv``, ``results.md`` and ``results.png`` in ``out_dir`` (atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["variant", "seed", *COLUMNS])
    w.writeheader()
    w.writerows(rows)
    write_atomic(os.path.join(out_dir, "results.csv"), buf.getvalue())
    write_atomic(os.path.join(out_dir, "results.md"), results_markdown(rows, title))
    if rows:
        with atomic_path(os.path.join(out_dir, "results.png")) as tmp:  # its name ends in .png
            plot_results(rows, tmp, title)
