"""Evaluation protocols on synthetic data: msvr310's scene rule, orbench's query sets and tables."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python

from hybrid_reid import load_config
from hybrid_reid.data import SynthSpec, generate, load_data
from hybrid_reid.evaluation import compute_distance, evaluate_rank

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SPEC = SynthSpec(ids=16, cams=3, images_per_cam=2, seed=7, size=(64, 32))
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def untrained_evaluator(overrides):
    """An untrained tiny model and an Evaluator on the data the overrides name."""
    from accelerate import Accelerator

    from hybrid_reid.engine.train import _evaluator, resolve_config
    from hybrid_reid.models import build_model

    torch.manual_seed(0)
    cfg = load_config(TINY, ["data.num_workers=0", "data.test_batch_size=64", "model.num_cams=0", *overrides])
    data = load_data(cfg.data)
    cfg = resolve_config(cfg, data)
    model = build_model(cfg.model, modalities=data.modalities)
    return _evaluator(Accelerator(cpu=True), cfg, data, model), model, data


def test_msvr310_protocol_removes_same_scene_not_same_camera(tmp_path):
    generate(str(tmp_path), SPEC, layout="msvr310")
    common = ["data.name=msvr310", f"data.root={tmp_path}"]
    results = {}
    for protocol in ("market", "msvr310"):
        ev, model, data = untrained_evaluator([*common, f"eval.protocol={protocol}"])
        results[protocol] = ev.run(model)
    q, g = ev.features["query"], ev.features["gallery"]
    dist = compute_distance(q["feat"], g["feat"]).numpy()
    qp, gp = q["pids"], g["pids"]
    scenes = (np.array([s.sceneid for s in data.query]), np.array([s.sceneid for s in data.gallery]))
    cams = (np.array([s.camid for s in data.query]), np.array([s.camid for s in data.gallery]))
    by_scene, by_cam = evaluate_rank(dist, qp, gp, *scenes), evaluate_rank(dist, qp, gp, *cams)
    assert results["msvr310"]["mAP"] == pytest.approx(100 * by_scene["mAP"])
    assert results["market"]["mAP"] == pytest.approx(100 * by_cam["mAP"])
    assert results["msvr310"]["mAP"] != results["market"]["mAP"]
    assert results["msvr310"]["protocol"] == "msvr310"


def test_orbench_protocol_without_query_sets_uses_every_subset(tmp_path):
    generate(str(tmp_path), SPEC)  # RGBNT201 layout: query = gallery
    ev, model, data = untrained_evaluator(["data.name=synthetic", f"data.root={tmp_path}",
                                           "data.synth.ids=16", "data.synth.cams=3", "data.synth.images_per_cam=2",
                                           "data.synth.seed=7", "data.synth.size=[64,32]", "eval.protocol=orbench",
                                           "model.modality_fusion=mean"])
    m = ev.run(model)
    assert list(m["orbench"]) == ["nir", "tir", "nir+tir", "average 1-modality", "average 2-modality", "average",
                                  "mean over sets"]
    t = m["orbench"]
    assert t["average 1-modality"]["mAP"] == pytest.approx((t["nir"]["mAP"] + t["tir"]["mAP"]) / 2)
    assert m["mAP"] == pytest.approx(t["average"]["mAP"]) == pytest.approx(
        (t["average 1-modality"]["mAP"] + t["nir+tir"]["mAP"]) / 2)
    assert t["mean over sets"]["mAP"] == pytest.approx((t["nir"]["mAP"] + t["tir"]["mAP"] + t["nir+tir"]["mAP"]) / 3)
    # query = gallery here: only the identical capture is removed, the other RGB images of the identity count
    q, g = ev.features["query:nir"], ev.features["gallery"]
    dist = compute_distance(q["feat"], g["feat"]).numpy()
    n = len(data.query)
    ref = evaluate_rank(dist, q["pids"], g["pids"], np.arange(n), np.arange(n))
    assert m["orbench"]["nir"]["mAP"] == pytest.approx(100 * ref["mAP"])
    assert ref["num_valid_queries"] == n


def test_orbench_needs_its_protocol_and_rgb(tmp_path):
    generate(str(tmp_path), SPEC, layout="orbench")
    with pytest.raises(ValueError, match="set eval.protocol=orbench"):
        untrained_evaluator(["data.name=orbench", f"data.root={tmp_path}", "data.modalities=[rgb,nir]"])


def test_orbench_training_reports_every_query_combination(tmp_path):
    generate(str(tmp_path / "data"), SynthSpec(ids=40, cams=3, images_per_cam=2, seed=1, size=(64, 32)),
             layout="orbench")
    out = tmp_path / "run"
    r = run_python("run.py", "train", "--config", os.path.join(ROOT, "configs", "orbench_hybrid.yaml"),
                   "model.img_size=[64,32]",
                   *[f"{k}={v}" for k, v in {
                       "data.root": tmp_path / "data", "data.num_workers": 0, "data.batch_size": 16,
                       "data.num_instances": 4, "train.epochs": 3, "train.warmup_epochs": 1,
                       "train.mixed_precision": "no", "train.eval_every": 0, "optim.lr": 1e-3,
                       "optim.group_lr": "{}", "model.feat_dim": 64, "model.clip.pretrained": "null",
                       "model.clip.tower_kwargs": "{width: 64, layers: 2, heads: 2, out_dim: 64}",
                       "model.vit.pretrained": "null", "model.vit.tower_kwargs": "{width: 64, layers: 2, heads: 2}",
                       "model.vit.stride": "null", "model.text.pretrained": "null", "model.text.context_length": 32,
                       "model.text.tower_kwargs": "{width: 32, layers: 1, heads: 2, out_dim: 64}",
                       "model.sdm.semantic_dim": 64, "model.sdm.heads": 2, "data.test_batch_size": 64,
                       "output_dir": out}.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    table = m["orbench"]
    sets = [k for k in table if not k.startswith(("average", "mean"))]
    assert len(sets) == 32 and "nir+cpencil+sketch+text" in sets and "cpencil+nir" in sets
    assert [k for k in table if k.startswith(("average", "mean"))] == [
        "average 1-modality", "average 2-modality", "average 3-modality", "average 4-modality", "average",
        "mean over sets"]
    sizes = [table[f"average {n}-modality"]["mAP"] for n in (1, 2, 3, 4)]
    # the headline is the benchmark's: the mean of the four per-size averages, not the mean over the 32 sets
    assert m["protocol"] == "orbench" and m["mAP"] == pytest.approx(sum(sizes) / 4, abs=1e-3)
    assert table["average"]["mAP"] == pytest.approx(m["mAP"], abs=1e-3)
    assert table["mean over sets"]["mAP"] == pytest.approx(sum(table[k]["mAP"] for k in sets) / 32, abs=1e-3)
    assert m["num_gallery"] == 12 * 6 and m["num_query"] == 32 * 2 * 12
    assert "| query | mAP |" in r.stdout and "| average 4-modality |" in r.stdout
    assert "query nir+cpencil+sketch+text" in r.stderr  # the loader's summary table
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss/sdm" in rec for rec in log)  # MER + SDM on: the alignment loss trains
