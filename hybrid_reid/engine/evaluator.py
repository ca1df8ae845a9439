"""Evaluation protocols on a model's features (``eval.protocol``), feature export.

* ``market``: every query against the gallery; same pid *and* camera removed (Market-1501, RGBNT201,
  RGBNT100).
* ``msvr310``: the same with the *scene* in place of the camera (MSVR310).
* ``missing``: ``market`` plus every case with some modalities taken from query and gallery alike
  (RGBNT201's missing-modality table).
* ``orbench``: an RGB gallery against one query set per modality combination (ORBench's JSON, or every
  non-empty subset of the non-RGB modalities when the data has no query sets); no camera filtering;
  a row per set, averages by the number of query modalities, and as the headline their mean (the
  benchmark's: each size weighs the same), beside the plain mean over sets.

Each protocol case extracts features with :func:`extract_features` (sharded over processes,
gathered with ``gather_for_metrics``) and ranks them with :func:`~hybrid_reid.evaluation.rank_metrics`.
"""
from __future__ import annotations

import json
import logging
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import Config
from ..data import PairedTransform, ReIDData, Sample, build_test_loader, canonical_modality
from ..evaluation import rank_metrics
from ..modalities import caption_modality, image_modalities, short_name
from ..registry import Registry
from ..utils import atomic_path

logger = logging.getLogger(__name__)

METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


@torch.no_grad()
def extract_features(accelerator: Accelerator, model, loader, feat: str = "bn",
                     modalities: Optional[List[str]] = None, zero: Sequence[str] = (),
                     desc: str = "features") -> torch.Tensor:
    """Features of every sample of ``loader.dataset`` in dataset order, gathered over processes: [N, F'].

    Args:
        modalities: compute the features from these modalities only (None = all in the batch).
        zero: image modalities fed as zeros (after normalisation) instead of their images.
        desc: the progress bar's label (main process; gone when done).

    Raises:
        RuntimeError: if the gathered indices are not exactly 0..N-1 once each.
    """
    model.eval()
    feats, indices = [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    for batch in bar:
        images = batch["images"] if modalities is None else \
            {k: x for k, x in batch["images"].items() if (caption_modality(k) or k) in modalities}
        images = {m: torch.zeros_like(x) if m in zero else x for m, x in images.items()}
        out = model(images, batch["cam_ids"], batch["view_ids"])
        f = out.retrieval_feat(feat)
        g = accelerator.gather_for_metrics({"feat": f.float().contiguous(), "index": batch["indices"]})
        feats.append(g["feat"].cpu())
        indices.append(g["index"].cpu())
    feats_t, index = torch.cat(feats), torch.cat(indices)
    n = len(loader.dataset)
    if len(index) != n or not torch.equal(torch.sort(index).values, torch.arange(n)):
        raise RuntimeError(f"gathered {len(index)} features ({len(torch.unique(index))} distinct) for {n} "
                           "test samples; evaluation would count duplicates or miss samples")
    return feats_t[torch.argsort(index)]


def missing_cases(modalities: Sequence[str]) -> List[Tuple[List[str], List[str]]]:
    """``(removed, present)`` for every non-empty proper subset of ``modalities`` removed, by size."""
    out = []
    for k in range(1, len(modalities)):
        for removed in combinations(modalities, k):
            out.append((list(removed), [m for m in modalities if m not in removed]))
    return out


def case_name(removed: Sequence[str]) -> str:
    """RGBNT201's names: ``r``, ``n``, ``t`` for rgb, nir, tir (other modalities by full name)."""
    return short_name(removed)


def eval_modalities(cfg: Config, data: ReIDData) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """``eval.query_modalities`` / ``eval.gallery_modalities``, canonical and checked (None = all)."""
    out = []
    for key in ("query_modalities", "gallery_modalities"):
        mods = getattr(cfg.eval, key)
        if mods is None:
            out.append(None)
            continue
        mods = [canonical_modality(m) for m in mods]
        bad = [m for m in mods if m not in data.modalities]
        if not mods or bad:
            raise ValueError(f"eval.{key}={mods}: must be a non-empty subset of data.modalities={data.modalities}")
        out.append(mods)
    return out[0], out[1]


def cases_table(title: str, cases: Dict[str, Dict[str, float]]) -> str:
    """A protocol's cases as a Markdown table (one row per case)."""
    lines = [f"| {title} | mAP | R1 | R5 | R10 | mINP |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in cases.items():
        lines.append(f"| {name} | {m['mAP']:.2f} | {m['rank1']:.2f} | {m['rank5']:.2f} | {m['rank10']:.2f} | "
                     f"{m['mINP']:.2f} |")
    return "\n".join(lines)


def metrics_table(metrics: Dict[str, object]) -> str:
    """The Markdown table printed at the end of a run: the main numbers, then each protocol's cases."""
    parts = [cases_table("protocol", {metrics.get("protocol", "market"): metrics})]
    if "missing" in metrics:
        parts.append(cases_table("missing", metrics["missing"]))
    if "orbench" in metrics:
        parts.append(cases_table("query", metrics["orbench"]))
    return "\n\n".join(parts)


def _mean(cases: Sequence[Dict[str, float]]) -> Dict[str, float]:
    return {k: float(np.mean([c[k] for c in cases])) for k in METRIC_KEYS}


class FeatureSet(dict):
    """One side of a ranking: ``{"feat": [N, F], "pids", "camids" (what the protocol filters on),
    "paths" (``modality=path;...`` per row), "samples", "modalities" (those the features use)}``."""

    @classmethod
    def of(cls, feat: torch.Tensor, samples: Sequence[Sample], modalities: Sequence[str],
           camids: Optional[Sequence[int]] = None) -> "FeatureSet":
        return cls(feat=feat, pids=np.asarray([s.pid for s in samples], dtype=np.int64),
                   camids=np.asarray(camids if camids is not None else [s.camid for s in samples], dtype=np.int64),
                   paths=[";".join(f"{m}={p}" for m, p in s.paths.items()) for s in samples], samples=list(samples),
                   modalities=list(modalities))


class Evaluator:
    """Runs ``cfg.eval.protocol`` on a model; builds (and prepares) its test loaders once.

    Args:
        accelerator: the run's accelerator (loaders are sharded over its processes).
        cfg: the resolved config.
        data: the data set.
        transform: the test transform (the model's mean / std and size).
        tokenize: the model's text tokenizer, or None.

    After :meth:`run`, :attr:`features` holds every feature set ranked (``query`` and ``gallery``;
    for ``missing`` also ``query:<case>`` / ``gallery:<case>``; for ``orbench``, ``gallery`` and
    ``query:<set>`` for each set), :attr:`ranked` the ``{name: (query set, gallery set)}`` pairs
    ranked and :attr:`curves` their CMC curves (percent), for :func:`save_features`,
    :func:`evaluate_saved` and :mod:`hybrid_reid.visualize`.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, data: ReIDData, transform: PairedTransform,
                 tokenize=None, handles_missing: bool = True) -> None:
        self.accelerator, self.cfg, self.data = accelerator, cfg, data
        self.transform, self.tokenize = transform, tokenize
        self.anchor = canonical_modality(cfg.data.anchor_modality)
        try:
            self.protocol = PROTOCOLS.get(cfg.eval.protocol)()
        except KeyError as e:
            raise ValueError(f"eval.protocol: {e.args[0]}") from None
        self.protocol.check(cfg, data)
        self.qm, self.gm = eval_modalities(cfg, data)
        partial = [f"eval.protocol={cfg.eval.protocol}"] if self.protocol.ranks_partial(cfg, data) else []
        partial += [f"eval.{k}={m}" for k, m in (("query_modalities", self.qm), ("gallery_modalities", self.gm))
                    if m is not None and m != data.modalities]
        if partial and not handles_missing:
            raise ValueError(f"model.modality_fusion={cfg.model.modality_fusion} needs every modality "
                             f"{data.modalities}, but {', '.join(partial)} ranks features of fewer; use a modality "
                             "fusion that handles absent modalities (concat, mean) for it"
                             + (self.protocol.partial_hint if partial[0].startswith("eval.protocol") else ""))
        self._loaders: Dict[str, object] = {}
        self.features: Dict[str, FeatureSet] = {}
        self.ranked: Dict[str, Tuple[str, str]] = {}
        self.curves: Dict[str, List[float]] = {}
        self.pair = None  # the model's modality fusion's pair_features (set by run)

    def loader(self, name: str, samples: Sequence[Sample], modalities: Sequence[str]):
        if name not in self._loaders:
            d = self.cfg.data
            loader = build_test_loader(samples, modalities, self.transform, d.test_batch_size, d.num_workers,
                                       d.cache_images, self.tokenize)
            self._loaders[name] = self.accelerator.prepare_data_loader(loader)
        return self._loaders[name]

    def rank(self, q: FeatureSet, g: FeatureSet) -> Dict[str, object]:
        """``rank_metrics`` of query against gallery with the ``eval`` settings (metric, re-ranking, AQE)."""
        e = self.cfg.eval
        rerank = (e.rerank_k1, e.rerank_k2, e.rerank_lambda) if e.rerank else None
        aqe = (e.aqe_k, e.aqe_alpha) if e.aqe else None
        qf, gf = q["feat"], g["feat"]
        if self.pair is not None:  # query and gallery of other modality sets (MDReID's any-to-any matching)
            qf, gf = self.pair(qf, q["modalities"], gf, g["modalities"])
        if qf.shape[1] != gf.shape[1]:
            raise ValueError(f"query features are {qf.shape[1]} wide and gallery features {gf.shape[1]}: they come "
                             "from other modality sets and only the model's fusion can pair them (MDReID's any-to-any);"
                             " evaluate with run.py eval --config ... --checkpoint ..., not from saved features")
        return rank_metrics(qf, gf, q["pids"], g["pids"], q["camids"], g["camids"], metric=e.metric,
                            max_rank=e.max_rank, rerank=rerank, aqe=aqe, chunk_size=e.chunk_size)

    def run(self, model) -> Dict[str, object]:
        """Metrics (percent) of ``model`` under ``eval.protocol``: the main numbers at the top level,
        the protocol's cases under its own key (``"missing"``, ``"orbench"``)."""
        self.features, self.ranked, self.curves = {}, {}, {}
        fusion = getattr(self.accelerator.unwrap_model(model, keep_torch_compile=False), "modality_fusion", None)
        self.pair = getattr(fusion, "pair_features", None)  # MDReID's any-to-any pairing
        self.protocol.features(self, model)
        return self.summarize()

    def summarize(self) -> Dict[str, object]:
        """Rank every pair of :attr:`ranked` and let the protocol combine the results."""
        results = {name: self.rank(self.features[q], self.features[g]) for name, (q, g) in self.ranked.items()}
        return self.protocol.summarize(self, results)

    @classmethod
    def from_saved(cls, cfg: Config, features: Dict[str, Dict[str, object]],
                   ranked: Dict[str, Sequence[str]]) -> "Evaluator":
        """An evaluator over feature sets saved by :func:`save_features` (no model, no data set):
        :meth:`summarize` gives the numbers of the run that saved them."""
        ev = cls.__new__(cls)
        ev.accelerator = ev.data = ev.transform = ev.tokenize = None
        ev.cfg, ev.anchor, ev.qm, ev.gm, ev._loaders = cfg, canonical_modality(cfg.data.anchor_modality), None, None, {}
        try:
            ev.protocol = PROTOCOLS.get(cfg.eval.protocol)()
        except KeyError as e:
            raise ValueError(f"eval.protocol: {e.args[0]}") from None
        missing = sorted({k for pair in ranked.values() for k in pair} - set(features))
        if missing:
            raise ValueError(f"the saved features lack the sets {missing} that were ranked")
        ev.features = {n: FeatureSet(feat=torch.as_tensor(np.asarray(f["feat"])), pids=np.asarray(f["pids"]),
                                     camids=np.asarray(f["camids"]), paths=list(f.get("paths", [])), samples=[],
                                     modalities=[]) for n, f in features.items()}
        ev.ranked = {n: (q, g) for n, (q, g) in ranked.items()}
        ev.curves, ev.pair = {}, None
        return ev

    def sides(self, model, loader, qm, gm, zero=(), camids=None) -> Tuple[FeatureSet, FeatureSet]:
        """Query and gallery feature sets of the test split (query and gallery modalities ``qm`` /
        ``gm``, None = all; ``zero``: modalities fed as zero images; ``camids(samples)``: what the
        protocol filters on, default the cameras)."""
        data, e = self.data, self.cfg.eval
        feats = extract_features(self.accelerator, model, loader, e.feat, qm, zero)
        other = feats if gm == qm else extract_features(self.accelerator, model, loader, e.feat, gm, zero)
        nq = len(data.query)
        qf, gf = (feats, other) if data.shared_query_gallery else (feats[:nq], other[nq:])
        ids = camids or (lambda ss: None)
        return (FeatureSet.of(qf, data.query, qm or data.modalities, ids(data.query)),
                FeatureSet.of(gf, data.gallery, gm or data.modalities, ids(data.gallery)))

    def test_loader(self):
        """The loader of the test split(s) with every modality."""
        data = self.data
        samples = data.query if data.shared_query_gallery else data.query + data.gallery
        return self.loader("test", samples, data.modalities)


#: Evaluation protocols by name (``eval.protocol``). A protocol is a class with ``check(cfg, data)``
#: (a bad setting fails before training) and ``run(evaluator, model) -> metrics``.
PROTOCOLS: Registry[type] = Registry("evaluation protocol")


class Protocol:
    """Base class: rank the test split's query features against its gallery; ``camids`` says what a
    match is filtered on (the camera here).

    A protocol computes feature sets and says which pairs to rank (:meth:`features`: fills
    ``ev.features`` and ``ev.ranked``), then combines the rankings' results into the metrics
    (:meth:`summarize`); the evaluator ranks in between. Saved features
    (``run.py eval --features``) go through the same :meth:`summarize`.
    """

    name = "market"
    #: ranks features of modality subsets (a fusion that needs every modality cannot run it)
    partial_inputs = False
    #: appended to the error when a fusion that needs every modality cannot run this protocol
    partial_hint = ""

    def ranks_partial(self, cfg: Config, data: ReIDData) -> bool:
        """Whether this protocol, as configured, feeds the model fewer than all modalities."""
        return self.partial_inputs

    @classmethod
    def check(cls, cfg: Config, data: ReIDData) -> None:
        if data.query_sets is not None:
            raise ValueError(f"data.name={data.name} has several query sets ({', '.join(data.query_sets)}); "
                             "set eval.protocol=orbench")
        if data.protocol == "msvr310" and cls.name == "market":
            logger.warning("data.name=%s: its papers evaluate with eval.protocol=msvr310 (same scene removed); "
                           "this run uses market (same camera removed)", data.name)

    @staticmethod
    def camids(samples: Sequence[Sample]) -> Optional[List[int]]:
        return None

    def features(self, ev: "Evaluator", model) -> None:
        q, g = ev.sides(model, ev.test_loader(), ev.qm, ev.gm, camids=self.camids)
        ev.features.update(query=q, gallery=g)
        ev.ranked["query"] = ("query", "gallery")

    def summarize(self, ev: "Evaluator", results: Dict[str, Dict[str, object]]) -> Dict[str, object]:
        result = dict(results["query"])
        ev.curves["query"] = result["cmc"]
        result["protocol"] = ev.cfg.eval.protocol
        return result


PROTOCOLS.register("market")(Protocol)


@PROTOCOLS.register("msvr310")
class SceneProtocol(Protocol):
    """MSVR310's rule: gallery items of the query's identity *and scene* are removed (at any camera)."""

    name = "msvr310"

    @classmethod
    def check(cls, cfg: Config, data: ReIDData) -> None:
        super().check(cfg, data)
        samples = data.query + data.gallery
        if any(s.sceneid < 0 for s in samples):
            raise ValueError(f"eval.protocol=msvr310 needs scene ids; data.name={data.name} has none (use market)")

    @staticmethod
    def camids(samples: Sequence[Sample]) -> Optional[List[int]]:
        return [s.sceneid for s in samples]


@PROTOCOLS.register("missing")
class MissingProtocol(Protocol):
    """RGBNT201's missing-modality table: the full-input numbers, then every case with some modalities
    taken from query and gallery alike (``eval.missing_fill``: left out, or zero images after
    normalisation as DeMo does), and their average, under ``"missing"``."""

    name = "missing"
    partial_inputs = True
    partial_hint = ", or set eval.missing_fill=zeros (zero images in their place: every modality is fed)"

    def ranks_partial(self, cfg: Config, data: ReIDData) -> bool:
        # zero images stand in for every removed image modality; a text modality is always left out
        return cfg.eval.missing_fill != "zeros" or image_modalities(data.modalities) != list(data.modalities)

    def features(self, ev: "Evaluator", model) -> None:
        super().features(ev, model)
        data, e = ev.data, ev.cfg.eval
        loader = ev.test_loader()
        for removed, present in missing_cases(data.modalities):
            if e.missing_fill == "zeros":
                zero = image_modalities(removed)
                kept = [m for m in data.modalities if m not in removed or m in zero]
            else:
                zero, kept = [], present
            name = case_name(removed)
            q, g = ev.sides(model, loader, kept, kept, zero, self.camids)
            ev.features.update({f"query:{name}": q, f"gallery:{name}": g})
            ev.ranked[name] = (f"query:{name}", f"gallery:{name}")

    def summarize(self, ev: "Evaluator", results: Dict[str, Dict[str, object]]) -> Dict[str, object]:
        result = super().summarize(ev, results)
        cases = {name: r for name, r in results.items() if name != "query"}
        cases["average"] = _mean(list(cases.values()))
        result["missing"] = {name: {k: c[k] for k in METRIC_KEYS} for name, c in cases.items()}
        return result


@PROTOCOLS.register("orbench")
class ORBenchProtocol(Protocol):
    """ORBench: a gallery of the anchor modality (``data.anchor_modality``, RGB) against every query
    set, no camera filtering; per set, the averages by number of query modalities, their mean (the
    benchmark's headline) and the mean over sets, under ``"orbench"``."""

    name = "orbench"
    partial_inputs = True

    @classmethod
    def check(cls, cfg: Config, data: ReIDData) -> None:
        anchor = canonical_modality(cfg.data.anchor_modality)
        if anchor not in data.modalities:
            raise ValueError(f"eval.protocol=orbench ranks against a gallery of the anchor modality {anchor!r}; "
                             f"data.modalities={data.modalities} does not have it (data.anchor_modality)")

    @staticmethod
    def query_sets(ev: "Evaluator") -> Dict[str, Tuple[List[Sample], List[str]]]:
        """``{name: (samples, modalities)}``: the data's query sets, or every non-empty subset of the
        modalities other than the anchor, on the query split."""
        data = ev.data
        if data.query_sets is not None:
            return {n: (q, list(q[0].modalities)) for n, q in data.query_sets.items() if q}
        others = [m for m in data.modalities if m != ev.anchor]
        if not others:
            raise ValueError(f"eval.protocol=orbench needs modalities besides {ev.anchor} to query with")
        return {"+".join(c): (data.query, list(c)) for k in range(1, len(others) + 1)
                for c in combinations(others, k)}

    def features(self, ev: "Evaluator", model) -> None:
        data, e, anchor = ev.data, ev.cfg.eval, ev.anchor
        shared = data.query_sets is None and data.shared_query_gallery
        # no camera filtering; when query and gallery are one split, only the identical capture is removed
        q_ids = lambda ss: list(range(len(ss))) if shared else [-1] * len(ss)  # noqa: E731
        gallery_feat = extract_features(ev.accelerator, model, ev.loader("gallery", data.gallery, [anchor]), e.feat,
                                        desc="gallery")
        ev.features["gallery"] = FeatureSet.of(gallery_feat, data.gallery, [anchor],
                                               list(range(len(data.gallery))) if shared else [0] * len(data.gallery))
        for name, (samples, mods) in self.query_sets(ev).items():
            loader = ev.loader(f"query:{name}", samples, mods)
            qf = extract_features(ev.accelerator, model, loader, e.feat, mods, desc=f"query {name}")
            ev.features[f"query:{name}"] = FeatureSet.of(qf, samples, mods, q_ids(samples))
            ev.ranked[name] = (f"query:{name}", "gallery")

    def summarize(self, ev: "Evaluator", results: Dict[str, Dict[str, object]]) -> Dict[str, object]:
        cases = dict(results)
        for name, c in cases.items():
            ev.curves[name] = c["cmc"]
        by_size: Dict[int, List[Dict[str, object]]] = {}
        for name, c in cases.items():
            by_size.setdefault(len(name.split("+")), []).append(c)
        table = {name: {k: c[k] for k in METRIC_KEYS} for name, c in cases.items()}
        size_means = []
        for size, cs in sorted(by_size.items()):
            table[f"average {size}-modality"] = _mean(cs)
            size_means.append(table[f"average {size}-modality"])
            ev.curves[f"average {size}-modality"] = list(np.mean([c["cmc"] for c in cs], axis=0))
        # the benchmark's headline (ReID5o): the mean of the per-size averages, so the 4 single-modality
        # tasks weigh as much as the 12 pairs; the plain mean over all sets is kept beside it
        table["average"] = _mean(size_means)
        table["mean over sets"] = _mean(list(cases.values()))
        result: Dict[str, object] = dict(table["average"])
        result["cmc"] = list(np.mean([ev.curves[f"average {s}-modality"] for s in sorted(by_size)], axis=0))
        result["protocol"] = "orbench"
        result["orbench"] = table
        return result


def save_features(path: str, features: Dict[str, FeatureSet], meta: Optional[Dict[str, object]] = None) -> None:
    """Write feature sets to ``path`` (atomically): ``.safetensors`` (paths and ``meta`` as JSON in the
    header's metadata) or ``.npz``. Keys: ``<set>.feat`` [N, F] float32, ``<set>.pids``,
    ``<set>.camids`` [N] int64, ``<set>.paths`` (``modality=path;...`` per row)."""
    tensors = {}
    for name, fs in features.items():
        tensors[f"{name}.feat"] = fs["feat"].float().contiguous().numpy()
        tensors[f"{name}.pids"] = fs["pids"]
        tensors[f"{name}.camids"] = fs["camids"]
    paths = {name: fs["paths"] for name, fs in features.items()}
    if path.endswith(".npz"):
        arrays = dict(tensors, **{f"{n}.paths": np.asarray(p) for n, p in paths.items()})
        arrays["meta"] = np.asarray(json.dumps(meta or {}))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        metadata = {"paths": json.dumps(paths), "meta": json.dumps(meta or {})}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    else:
        raise ValueError(f"--save-features {path}: use a .safetensors or .npz file name")


def load_features_meta(path: str) -> Dict[str, object]:
    """The ``meta`` :func:`save_features` wrote beside the sets (``{}`` if none)."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            return json.loads(str(z["meta"])) if "meta" in z.files else {}
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_features(path: str) -> Dict[str, Dict[str, object]]:
    """Read :func:`save_features`'s file back: ``{set: {"feat", "pids", "camids", "paths"}}``."""
    out: Dict[str, Dict[str, object]] = {}
    if path.endswith(".npz"):
        with np.load(path) as z:
            items = {k: z[k] for k in z.files if k != "meta"}
        for k, v in items.items():
            name, field = k.rsplit(".", 1)
            out.setdefault(name, {})[field] = v.tolist() if field == "paths" else v
        return out
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        paths = json.loads(f.metadata()["paths"])
        for k in f.keys():
            name, field = k.rsplit(".", 1)
            out.setdefault(name, {})[field] = f.get_tensor(k)
    for name, p in paths.items():
        out[name]["paths"] = p
    return out
