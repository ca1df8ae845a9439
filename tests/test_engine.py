"""End to end: a tiny hybrid trains on a tiny synthetic set; resume is exact; eval and torchrun agree."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python
from safetensors.torch import load_file

from hybrid_reid import load_config
from hybrid_reid.engine import train

QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_overrides(root, out, epochs):
    """The quickstart config shrunk: 24 identities, 3 cameras, 6 steps per epoch."""
    return [f"data.root={root}", "data.synth.ids=24", "data.synth.cams=3", "data.synth.images_per_cam=2",
            "data.synth.size=[64,32]", "data.batch_size=16", "data.num_instances=2", "data.test_batch_size=32",
            f"train.epochs={epochs}", "train.warmup_epochs=1", "train.eval_every=0", "train.log_every=2",
            "train.keep_checkpoints=3", "optim.lr=2e-3", f"output_dir={out}"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """Untrained (epochs=0) and trained (8 epochs) runs of the same tiny hybrid."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, epochs in (("untrained", 0), ("trained", 8)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = load_config(QUICK, tiny_overrides(data_root, out / name, epochs))
        runs[name] = (train(cfg), out / name)
    return runs


def test_training_raises_map_well_above_untrained(trained):
    untrained, _ = trained["untrained"]
    metrics, out = trained["trained"]
    assert metrics["mAP"] > untrained["mAP"] + 20, (untrained["mAP"], metrics["mAP"])
    assert metrics["rank1"] >= untrained["rank1"]
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert 0 <= metrics[key] <= 100
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["mAP"] == metrics["mAP"] and on_disk["epoch"] == 8 and on_disk["modalities"] == ["rgb", "nir", "tir"]
    assert on_disk["num_query"] == on_disk["num_gallery"] == on_disk["num_valid_queries"] > 0


def test_run_outputs(trained):
    _, out = trained["trained"]
    cfg = load_config(str(out / "config.yaml"))  # the resolved config loads back
    assert cfg.model.num_classes > 0 and cfg.model.num_cams == 3 and cfg.train.epochs == 8
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch_006", "epoch_007", "epoch_008"]  # keep 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(1, 9))
    assert any(r["kind"] == "step" and "loss/triplet" in r for r in records)
    csv_lines = (out / "log.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,loss") and len(csv_lines) == 9
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "tensorboard") for f in fs)
    state = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("encoder.backbones.clip.") for k in state) and "head.classifier.weight" in state


def test_resume_from_epoch_1_reproduces_the_uninterrupted_run(data_root, tmp_path):
    full = tmp_path / "full"
    cfg = load_config(QUICK, tiny_overrides(data_root, full, 3))
    uninterrupted = train(cfg)

    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "epoch_001", resumed_dir / "checkpoints" / "epoch_001")
    resumed = train(load_config(QUICK, tiny_overrides(data_root, resumed_dir, 3)), resume="latest")
    for key in ("mAP", "rank1", "rank5", "mINP", "epoch", "steps"):
        assert resumed[key] == uninterrupted[key], key
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_cli_reproduces_the_training_metrics(trained, data_root, tmp_path):
    metrics, out = trained["trained"]
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "eval", 8))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert ev["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3) and ev["rank1"] == metrics["rank1"]
    # pointed at the training run's own folder, eval leaves the run's metrics.json as it was
    before = (out / "metrics.json").read_bytes()
    run_args = ["run.py", "eval", "--config", str(out / "config.yaml"), "--checkpoint", str(out / "model.safetensors")]
    r = run_python(*run_args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "metrics.json").read_bytes() == before
    assert json.loads((out / "eval_metrics.json").read_text())["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)
    r = run_python(*run_args, "--out", str(out / "metrics.json"))
    assert r.returncode == 2 and "would replace a training run's metrics.json" in r.stderr
    assert (out / "metrics.json").read_bytes() == before
    # a checkpoint folder works too, and a checkpoint for another model is refused with its keys named
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "checkpoints" / "epoch_008"),
                   *tiny_overrides(data_root, tmp_path / "eval2", 8))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "eval3", 8), "model.backbone=clip")
    assert r.returncode == 2 and "does not fit this model" in r.stderr and "unexpected" in r.stderr


def test_torchrun_two_processes_matches_one(trained, data_root, tmp_path):
    metrics, _ = trained["trained"]
    untrained, _ = trained["untrained"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run.py", "train",
           "--config", QUICK, *tiny_overrides(data_root, out, 8)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["num_processes"] == 2 and ddp["steps"] == 8 * 6  # the same optimizer steps as one process
    assert ddp["num_valid_queries"] == metrics["num_valid_queries"]  # every test sample once
    assert abs(ddp["mAP"] - metrics["mAP"]) < 12, (ddp["mAP"], metrics["mAP"])
    assert ddp["mAP"] > untrained["mAP"] + 20
    epochs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == list(range(1, 9))  # written once, by rank 0


def test_cli_bad_data_is_one_clear_error(tmp_path):
    r = run_python("run.py", "train", "--config", os.path.join(ROOT, "configs", "rgbnt201_hybrid.yaml"),
                   f"data.root={tmp_path}", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: data.root='{tmp_path}' has no RGBNT201/ folder")
    assert not (tmp_path / "out").exists()  # nothing written before the data is checked


def test_synth_cli(tmp_path):
    r = run_python("run.py", "synth", "--out", str(tmp_path), "--ids", "6", "--cams", "2", "--seed", "1",
                   "--images-per-cam", "1")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "RGBNT201" / "test" / "NI")) + \
        len(os.listdir(tmp_path / "RGBNT201" / "train_171" / "NI")) == 12
    r = run_python("run.py", "synth", "--out", str(tmp_path), "--ids", "6")
    assert r.returncode == 2 and "--force" in r.stderr


def test_accelerate_launch_one_process_is_identical_to_python(data_root, tmp_path):
    # the same CPU threads for both (the bits depend on them); whatever OMP_NUM_THREADS the shell exports
    threads = str(torch.get_num_threads())
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=threads)
    plain = subprocess.run([sys.executable, "run.py", "train", "--config", QUICK,
                            *tiny_overrides(data_root, tmp_path / "plain", 2)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", threads, "run.py",
         "train", "--config", QUICK, *tiny_overrides(data_root, tmp_path / "launched", 2)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    b = json.loads((tmp_path / "launched" / "metrics.json").read_text())
    for key in ("mAP", "rank1", "mINP", "steps"):
        assert a[key] == b[key], key


def test_experts_text_and_any_combination_eval_end_to_end(data_root, tmp_path):
    """MER + tokenizers + SDM + text train through the engine; eval scores nir queries against an rgb gallery."""
    out = tmp_path / "experts"
    cfg = load_config(QUICK, tiny_overrides(data_root, out, 2) + [
        "data.modalities=[rgb, nir, tir, text]", "model.mer.enabled=true", "model.tokenizers.enabled=true",
        "model.sdm.enabled=true", "model.sdm.semantic_dim=32", "eval.query_modalities=[nir]",
        "eval.gallery_modalities=[rgb]", "model.clip_consistency.weight=0.01",
        "model.clip_consistency.schedule=[[0, 0.0], [1, 1.0]]"])
    metrics = train(cfg)
    assert metrics["query_modalities"] == ["nir"] and metrics["gallery_modalities"] == ["rgb"]
    assert 0 < metrics["mAP"] <= 100
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert any("loss/sdm" in r for r in steps if r["kind"] == "step")
    assert not any("loss/clip_consistency" in r for r in steps if r["epoch"] == 1)  # scheduled: off in epoch 1
    assert any("loss/clip_consistency" in r for r in steps if r["epoch"] == 2)
    state = load_file(str(out / "model.safetensors"))
    assert any("lora_B.nir" in k for k in state) and any(k.startswith("text_encoder.") for k in state)
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "ev", 2), "data.modalities=[rgb, nir, tir, text]",
                   "model.mer.enabled=true", "model.tokenizers.enabled=true", "model.sdm.enabled=true",
                   "model.sdm.semantic_dim=32", "eval.query_modalities=[text]", "eval.gallery_modalities=[rgb, nir]")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert ev["query_modalities"] == ["text"] and 0 < ev["mAP"] <= 100
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "ev2", 2), "eval.query_modalities=[sketch]")
    assert r.returncode == 2 and "eval.query_modalities=['sketch']" in r.stderr


@pytest.mark.parametrize("fill", ["drop", "zeros"])
def test_missing_modality_protocol_scores_each_case(trained, data_root, tmp_path, fill):
    metrics, out = trained["trained"]
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / fill, 8), "eval.protocol=missing", f"eval.missing_fill={fill}")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / fill / "eval_metrics.json").read_text())
    assert ev["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)  # the full-input numbers stay on top
    cases = ev["missing"]
    assert list(cases) == ["r", "n", "t", "rn", "rt", "nt", "average"]
    assert cases["average"]["mAP"] == pytest.approx(sum(cases[c]["mAP"] for c in list(cases)[:6]) / 6, abs=1e-3)
    assert cases["average"]["mAP"] < ev["mAP"]  # taking modalities away costs accuracy
    assert "| missing | mAP |" in r.stdout and "| average |" in r.stdout


def test_single_modality_market1501_runs_through_the_same_model(tmp_path):
    from hybrid_reid.data import SynthSpec, generate

    generate(str(tmp_path / "data"), SynthSpec(ids=24, cams=3, images_per_cam=2, size=(64, 32)), layout="market1501")
    r = run_python("run.py", "train", "--config", QUICK, "data.name=market1501", f"data.root={tmp_path / 'data'}",
                   "data.modalities=[rgb]", "data.batch_size=16", "data.num_instances=2", "train.epochs=2",
                   "train.warmup_epochs=1", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["dataset"] == "market1501" and m["modalities"] == ["rgb"] and 0 < m["mAP"] <= 100
    assert m["num_query"] == 7 * 3 and m["num_gallery"] == 7 * 3 + 2


def test_eval_save_features_and_extract(trained, data_root, tmp_path):
    from hybrid_reid.engine import load_features
    from hybrid_reid.evaluation import rank_metrics

    metrics, out = trained["trained"]
    feats_path = tmp_path / "feats.npz"
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "ev", 8), "--save-features", str(feats_path))
    assert r.returncode == 0, r.stderr[-3000:]
    f = load_features(str(feats_path))
    q, g = f["query"], f["gallery"]
    assert q["feat"].shape[0] == len(q["pids"]) == len(q["paths"]) and q["paths"][0].startswith("rgb=")
    again = rank_metrics(torch.from_numpy(q["feat"]), torch.from_numpy(g["feat"]), q["pids"], g["pids"],
                         q["camids"], g["camids"])
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)  # the saved features give the reported numbers
    # extract: a folder with modality sub-folders, paired by name, through the run's resolved config
    test_dir = os.path.join(data_root, "RGBNT201", "test")
    feats_out = tmp_path / "folder.safetensors"
    r = run_python("run.py", "extract", "--config", str(out / "config.yaml"), "--checkpoint",
                   str(out / "model.safetensors"), "--images", test_dir, "--out", str(feats_out))
    assert r.returncode == 0, r.stderr[-3000:]
    e = load_features(str(feats_out))["images"]
    assert e["feat"].shape == q["feat"].shape
    by_path = {p: i for i, p in enumerate(q["paths"])}
    order = [by_path[p] for p in e["paths"]]
    # same images, same camera ids (the synthetic test set: camera from the name) -> same features where cam 0
    cam0 = [i for i, j in enumerate(order) if q["camids"][j] == 0]
    assert cam0 and np.abs(e["feat"][cam0] - q["feat"][[order[i] for i in cam0]]).max() < 1e-4
    # a plain folder of one modality: the concat fusion cannot represent NIR alone (its RGB and TIR
    # thirds would be zeros for every image), so that is refused rather than written
    r = run_python("run.py", "extract", "--config", str(out / "config.yaml"), "--checkpoint",
                   str(out / "model.safetensors"), "--images", os.path.join(test_dir, "NI"), "--modality", "nir",
                   "--out", str(tmp_path / "nir.npz"))
    assert r.returncode == 2 and "128 of its 192 dimensions would be the same constant" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "nir.npz").exists()
    r = run_python("run.py", "extract", "--config", str(out / "config.yaml"), "--checkpoint",
                   str(out / "model.safetensors"), "--images", os.path.join(test_dir, "NI"), "--modality", "sketch")
    assert r.returncode == 2 and "'sketch'" in r.stderr


def test_a_finished_run_is_a_model_folder(trained):
    from hybrid_reid.pretrained import read_metadata

    metrics, out = trained["trained"]
    meta = read_metadata(str(out / "model.safetensors"))
    assert meta["format"] == "hybrid_reid.model.v1" and meta["modalities"] == ["rgb", "nir", "tir"]
    assert meta["feature_dim"] == 192 and meta["input_size"] == [64, 32] and meta["eval_feat"] == "bn"
    card = (out / "README.md").read_text()
    assert f"| {metrics['mAP']:.2f} | {metrics['rank1']:.2f} |" in card and "protocol `market`" in card
    assert "8 epochs" in card and "```bash" in card  # how it was trained, and the command


def test_eval_features_gives_the_runs_numbers_without_model_or_images(trained, data_root, tmp_path):
    """run.py eval --features: every protocol's numbers from the saved sets alone (missing: 7 rankings)."""
    _, out = trained["trained"]
    feats = tmp_path / "feats.safetensors"
    r = run_python("run.py", "eval", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   *tiny_overrides(data_root, tmp_path / "ev", 8), "eval.protocol=missing", "--save-features",
                   str(feats), "--out", str(tmp_path / "direct.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_python("run.py", "eval", "--features", str(feats), "--out", str(tmp_path / "saved.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    direct, saved = (json.loads((tmp_path / f).read_text()) for f in ("direct.json", "saved.json"))
    # the feature extractor on the run folder gives the evaluation's features (L2-normalised)
    from hybrid_reid import FeatureExtractor
    from hybrid_reid.engine import load_features

    q = load_features(str(feats))["query"]
    rows = [0, 5, 11]
    paths = [dict(kv.split("=", 1) for kv in q["paths"][i].split(";")) for i in rows]
    got = FeatureExtractor(str(out), device="cpu")({m: [p[m] for p in paths] for m in ("rgb", "nir", "tir")},
                                                   cam_ids=q["camids"][rows])
    expected = torch.nn.functional.normalize(torch.from_numpy(q["feat"][rows]), dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP", "missing", "cmc"):
        assert saved[key] == direct[key], key
    assert set(direct["missing"]) == {"r", "n", "t", "rn", "rt", "nt", "average"}
    # other eval settings on the same features, still without a model: cosine instead of euclidean
    r = run_python("run.py", "eval", "--features", str(feats), "eval.metric=cosine", "--out", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_python("run.py", "eval", "--features", str(tmp_path / "nope.npz"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_visualize_writes_cmc_rank_lists_and_tsne(trained, data_root, tmp_path):
    from PIL import Image

    _, out = trained["trained"]
    vis = tmp_path / "vis"
    r = run_python("run.py", "visualize", "--config", QUICK, "--checkpoint", str(out / "model.safetensors"),
                   "--out", str(vis), "--queries", "3", *tiny_overrides(data_root, tmp_path / "v", 8))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(vis)) == ["cmc.png", "curves.png", "ranklist_query.png", "tsne.png"]
    ranks = np.asarray(Image.open(vis / "ranklist_query.png").convert("RGB"))
    # 3 rows of query + 10 results, each cell 3 modalities of 64x128 plus a 4-pixel border
    assert ranks.shape[0] >= 3 * 128 and ranks.shape[1] >= 11 * 3 * 64
    green = ((ranks[..., 1] > 150) & (ranks[..., 0] < 80) & (ranks[..., 2] < 100)).sum()
    red = ((ranks[..., 0] > 190) & (ranks[..., 1] < 60) & (ranks[..., 2] < 60)).sum()
    assert green > 0 and red > 0  # both correct and wrong matches are framed
    for name in ("cmc.png", "tsne.png"):
        img = np.asarray(Image.open(vis / name).convert("RGB"))
        assert img.shape[0] > 300 and img.std() > 10  # a drawn figure, not a blank canvas
