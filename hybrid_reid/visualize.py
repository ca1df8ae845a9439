"""Looking at results (``run.py visualize``): CMC curves, rank lists and a t-SNE of the test features.

Everything is computed from the same features and protocol as ``run.py eval`` (the ranking shown
is the plain distance ranking, before re-ranking / query expansion, with the protocol's removals).
"""
from __future__ import annotations

import logging
import os
import textwrap
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .config import Config
from .data.datasets import Sample, open_image
from .modalities import is_text

logger = logging.getLogger(__name__)

CELL = (64, 128)  # one modality's image in a rank list: width, height
GREEN, RED, BLUE = (40, 170, 60), (210, 40, 40), (40, 90, 210)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cmc(curves: Dict[str, Sequence[float]], path: str, title: str = "CMC") -> str:
    """One CMC curve (percent, rank 1..N) per entry of ``curves``, to ``path``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name, cmc in curves.items():
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, cmc, label=f"{name} (R1 {cmc[0]:.1f})", lw=1.6)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.set_xlim(1, max(len(c) for c in curves.values()))
    ax.set_ylim(0, 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) > 4 else 9, loc="lower right", ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(log_csv: str, path: str, title: str = "training") -> str:
    """The training curves of a run's ``log.csv``: loss per epoch (and the learning rate) on the left,
    mAP and rank-1 at the evaluated epochs on the right, to ``path``."""
    import csv

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log_csv}: no epochs logged")

    def column(name: str):
        xs = [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [x for x, _ in xs], [y for _, y in xs]

    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    ax.plot(*column("loss"), color="tab:blue", lw=1.6, label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(*column("lr"), color="tab:gray", lw=1.0, ls="--", label="lr")
    lr.set_ylabel("learning rate")
    ax.legend(handles=ax.get_lines() + lr.get_lines(), loc="upper right", fontsize=8)
    ax.set_title(f"{title}: loss")
    for name, color in (("mAP", "tab:red"), ("rank1", "tab:green")):
        x, y = column(name)
        if x:
            bx.plot(x, y, "o-", color=color, lw=1.4, ms=4, label=f"{name} (last {y[-1]:.1f})")
    bx.set_xlabel("epoch")
    bx.set_ylabel("%")
    bx.set_ylim(0, 100.5)
    bx.grid(alpha=0.3)
    if bx.get_lines():
        bx.legend(loc="lower right", fontsize=8)
    bx.set_title(f"{title}: evaluation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _text_panel(text: str, size) -> Image.Image:
    panel = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(panel)
    y = 2
    for line in textwrap.wrap(text, width=max(8, size[0] // 6)):
        draw.text((2, y), line, fill=(20, 20, 20))
        y += 11
    return panel


def sample_cell(s: Sample, modalities: Sequence[str], border, label: str = "") -> Image.Image:
    """Every modality of ``s`` side by side (a caption as a text panel), framed in ``border``."""
    w, h = CELL
    parts = []
    for m in modalities:
        if is_text(m):
            parts.append(_text_panel(s.text or "", (w * 2, h)))
        else:
            parts.append(open_image(s.paths[m], s.crops.get(m) if s.crops else None).resize((w, h)))
    b = 4
    cell = Image.new("RGB", (sum(p.width for p in parts) + 2 * b, h + 2 * b + 14), border)
    x = b
    for p in parts:
        cell.paste(p, (x, b))
        x += p.width
    ImageDraw.Draw(cell).text((b, h + b + 1), label, fill=(255, 255, 255))
    return cell


def rank_list_image(qf, gf, q_samples: List[Sample], g_samples: List[Sample], q_pids, g_pids, q_cams, g_cams,
                    q_mods: Sequence[str], g_mods: Sequence[str], queries: Sequence[int], topk: int = 10,
                    metric: str = "euclidean") -> Image.Image:
    """Rows of ``query | top-k gallery`` (green border: same identity, red: not), the gallery items
    with the query's pid and camera (scene) removed as the protocol does."""
    from .evaluation import compute_distance

    dist = compute_distance(qf[list(queries)], gf, metric).numpy()
    rows = []
    for row, qi in enumerate(queries):
        keep = ~((g_pids == q_pids[qi]) & (g_cams == q_cams[qi]))
        order = [j for j in np.argsort(dist[row], kind="stable") if keep[j]][:topk]
        cells = [sample_cell(q_samples[qi], q_mods, BLUE, f"query id {q_pids[qi]}")]
        cells += [sample_cell(g_samples[j], g_mods, GREEN if g_pids[j] == q_pids[qi] else RED,
                              f"{r + 1}: id {g_pids[j]}") for r, j in enumerate(order)]
        width = sum(c.width for c in cells) + 12 * len(cells)
        line = Image.new("RGB", (width, max(c.height for c in cells)), (255, 255, 255))
        x = 0
        for i, c in enumerate(cells):
            line.paste(c, (x, 0))
            x += c.width + (24 if i == 0 else 6)
        rows.append(line)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 6
    return out


def plot_tsne(features: Dict[str, np.ndarray], pids: Dict[str, np.ndarray], path: str, seed: int = 0,
              max_points: int = 3000) -> str:
    """A 2-d t-SNE (scikit-learn) of the features of every set, coloured by identity, one marker per set."""
    from sklearn.manifold import TSNE

    plt = _plt()
    names = list(features)
    feats = np.concatenate([features[n] for n in names])
    labels = np.concatenate([pids[n] for n in names])
    which = np.concatenate([np.full(len(features[n]), i) for i, n in enumerate(names)])
    if len(feats) > max_points:
        keep = np.random.default_rng(seed).choice(len(feats), max_points, replace=False)
        feats, labels, which = feats[keep], labels[keep], which[keep]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    xy = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(feats) - 1) / 3)), init="pca",
              random_state=seed).fit_transform(feats)
    ids = np.unique(labels)
    colour = {p: i for i, p in enumerate(ids)}
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=120)
    markers = "o^sPXD*v<>"
    for i, n in enumerate(names):
        sel = which == i
        ax.scatter(xy[sel, 0], xy[sel, 1], c=[cmap(colour[p] % 20) for p in labels[sel]], s=14,
                   marker=markers[i % len(markers)], edgecolors="none", alpha=0.85)
    handles = [plt.Line2D([], [], ls="", marker=markers[i % len(markers)], color="0.35", label=n)
               for i, n in enumerate(names)]
    ax.set_title(f"t-SNE of test features ({len(ids)} identities, colour = identity)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def visualize(cfg: Config, checkpoint: str, out_dir: str, num_queries: int = 6, topk: int = 10,
              max_sets: int = 4) -> Dict[str, List[str]]:
    """Evaluate ``checkpoint`` and write ``cmc.png``, ``ranklist_<set>.png`` (``num_queries`` evenly
    spread queries each, for at most ``max_sets`` query sets: the first ones and the last, which has
    every modality) and ``tsne.png`` to ``out_dir``.

    When the checkpoint's run folder has a ``log.csv``, also ``curves.png`` (loss, learning rate,
    mAP and rank-1 per epoch).

    Returns ``{"cmc": [...], "ranklists": [...], "tsne": [...], "curves": [...]}`` paths.
    """
    from .engine.train import load_trained

    accelerator, data, cfg, model, evaluator = load_trained(cfg, checkpoint)
    metrics = evaluator.run(model)
    if not accelerator.is_main_process:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    written: Dict[str, List[str]] = {"cmc": [], "ranklists": [], "tsne": [], "curves": []}
    run_dir = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    parents = [run_dir, os.path.dirname(run_dir), os.path.dirname(os.path.dirname(run_dir)), cfg.output_dir]
    for folder in dict.fromkeys(parents):  # OUTPUT_DIR/model.safetensors, or OUTPUT_DIR/checkpoints/epoch_NNN
        log_csv = os.path.join(folder, "log.csv")
        if os.path.isfile(log_csv):
            written["curves"].append(plot_curves(log_csv, os.path.join(out_dir, "curves.png"),
                                                 os.path.basename(os.path.normpath(folder))))
            break
    title = f"CMC ({data.name}, {cfg.eval.protocol}; mAP {metrics['mAP']:.1f})"
    curves = evaluator.curves
    if len(curves) > 8:  # ORBench's 32 sets: the averages by number of query modalities
        curves = {n: c for n, c in curves.items() if n.startswith("average")}
    written["cmc"].append(plot_cmc(curves, os.path.join(out_dir, "cmc.png"), title))
    feats = evaluator.features
    ranked = list(evaluator.ranked.items())
    if len(ranked) > max_sets:  # the first sets and the one with every modality
        ranked = ranked[:max_sets - 1] + ranked[-1:]
    for name, (qk, gk) in ranked:
        q, g = feats[qk], feats[gk]
        qf, gf = q["feat"], g["feat"]
        if evaluator.pair is not None:  # other modality sets: the features the evaluation ranked (MDReID)
            qf, gf = evaluator.pair(qf, q["modalities"], gf, g["modalities"])
        picks = np.unique(np.linspace(0, len(q["pids"]) - 1, min(num_queries, len(q["pids"]))).astype(int))
        img = rank_list_image(qf, gf, q["samples"], g["samples"], q["pids"], g["pids"], q["camids"],
                              g["camids"], q["modalities"], g["modalities"], picks.tolist(), topk, cfg.eval.metric)
        path = os.path.join(out_dir, f"ranklist_{name.replace('+', '-')}.png")
        img.save(path)
        written["ranklists"].append(path)
    distinct: Dict[str, dict] = {}
    shown = {k for _, pair in ranked for k in pair}
    for n, fs in feats.items():  # query = gallery (RGBNT201): plot the features once
        if n not in shown:
            continue
        if not any(fs["feat"] is d["feat"] for d in distinct.values()):
            distinct[n] = fs
    sets = {n: fs["feat"].numpy() for n, fs in distinct.items()}
    width = next(iter(sets.values())).shape[1]
    other = [n for n, f in sets.items() if f.shape[1] != width]
    if other:  # features of other modality sets that are only comparable in pairs (MDReID's any-to-any)
        logger.info("t-SNE: %s left out (their features are %s wide, %s's %d)", other,
                    sorted({sets[n].shape[1] for n in other}), next(iter(sets)), width)
        sets = {n: f for n, f in sets.items() if n not in other}
        distinct = {n: fs for n, fs in distinct.items() if n not in other}
    written["tsne"].append(plot_tsne(sets, {n: fs["pids"] for n, fs in distinct.items()},
                                     os.path.join(out_dir, "tsne.png"), seed=cfg.seed))
    logger.info("wrote %s", ", ".join(p for ps in written.values() for p in ps))
    return written
