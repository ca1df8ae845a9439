"""A model you can ship: model folders, the feature extractor, export, trackers, saved-feature evaluation."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python
from PIL import Image
from safetensors import safe_open

from hybrid_reid import FeatureExtractor, ReIDModel, build_model, load_config
from hybrid_reid.config import ConfigError

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
MODS = ["rgb", "nir", "tir"]


def tiny_model(tmp_path, *overrides, modalities=MODS):
    cfg = load_config(TINY, ["model.num_classes=7", "model.num_cams=3", f"data.modalities={modalities}",
                             *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, modalities=modalities).eval()
    with torch.no_grad():  # a trained-looking BNNeck (running statistics away from 0 / 1)
        model.head.bnneck.running_mean.normal_(0, 0.1)
        model.head.bnneck.running_var.uniform_(0.5, 2.0)
    folder = tmp_path / "model"
    model.save_pretrained(str(folder), config=cfg)
    return model, cfg, folder


def images(tmp_path, n=3, size=(50, 24), seed=0):
    """``n`` random RGB images per modality on disk: {modality: [paths]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in MODS:
        d = tmp_path / "imgs" / m
        d.mkdir(parents=True, exist_ok=True)
        out[m] = []
        for i in range(n):
            p = d / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(p)
            out[m].append(str(p))
    return out


def test_model_folder_round_trip_gives_identical_features(tmp_path):
    model, cfg, folder = tiny_model(tmp_path)
    assert sorted(os.listdir(folder)) == ["README.md", "config.yaml", "model.safetensors"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hybrid_reid.model.v1" and json.loads(meta["modalities"]) == MODS
    assert json.loads(meta["input_size"]) == [64, 32] and meta["feature_dim"] == "192"
    assert json.loads(meta["architecture"]) == {"clip": "ViT-B-16-quickgelu", "vit": "vit_base_patch16_224"}
    card = (folder / "README.md").read_text()
    assert "library_name: hybrid_reid" in card and "torch " + torch.__version__ in card
    loaded = ReIDModel.from_pretrained(str(folder), device="cpu")
    assert loaded.head.classifier is None  # inference never needs the classifier
    x = {m: torch.randn(3, 3, 64, 32) for m in MODS}
    cams = torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, cams).bn_feat, loaded(x, cams).bn_feat)
    # and again: a loaded model saves itself (it carries its config)
    loaded.save_pretrained(str(tmp_path / "again"))
    again = ReIDModel.from_pretrained(str(tmp_path / "again"), device="cpu")
    with torch.no_grad():
        assert torch.equal(again(x, cams).bn_feat, loaded(x, cams).bn_feat)


def test_from_pretrained_names_what_a_model_folder_holds(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        ReIDModel.from_pretrained(str(tmp_path))


def test_extractor_paths_pil_and_bgr_numpy_crops_agree(tmp_path):
    """A single-modality model: a path, its PIL image, its BGR numpy array (as a tracker holds a
    crop) and its RGB array with bgr=False give the same feature; uint8 tensors too."""
    _, _, folder = tiny_model(tmp_path, "model.modality_fusion=mean", modalities=["rgb"])
    paths = images(tmp_path)["rgb"]
    ex = FeatureExtractor(str(folder), device="cpu", batch_size=2)
    by_path = ex(paths, cam_ids=[0, 1, 2])
    assert by_path.shape == (3, 64) and torch.allclose(by_path.norm(dim=1), torch.ones(3))
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert torch.equal(ex([Image.open(p) for p in paths], cam_ids=[0, 1, 2]), by_path)
    assert torch.equal(ex([a[:, :, ::-1].copy() for a in rgb], cam_ids=[0, 1, 2]), by_path)  # BGR, the default
    assert torch.equal(ex(rgb, cam_ids=[0, 1, 2], bgr=False), by_path)
    assert not torch.allclose(ex(rgb, cam_ids=[0, 1, 2]), by_path)  # RGB read as BGR: a different feature
    one = ex(rgb[1][:, :, ::-1].copy(), cam_ids=[1])  # one crop
    assert one.shape == (1, 64) and torch.allclose(one[0], by_path[1], atol=1e-6)  # batch of 1: float noise
    # tensors already at the input size, [0, 1]: the same pixels as the PIL path
    at_size = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((32, 64), Image.BICUBIC)))
                           .permute(2, 0, 1) for p in paths])
    assert torch.allclose(ex(at_size, cam_ids=[0, 1, 2]), by_path, atol=1e-6)


def test_extractor_equals_run_py_extract_on_a_multi_modal_folder(tmp_path):
    from hybrid_reid.engine import load_features

    _, _, folder = tiny_model(tmp_path)
    paths = images(tmp_path, n=4)
    ex = FeatureExtractor(str(folder), device="cpu")
    feats = ex(paths)  # {modality: paths}, camera 0 (the default, as run.py extract --cam 0)
    assert feats.shape == (4, 192)
    out = tmp_path / "f.npz"
    r = run_python("run.py", "extract", "--config", str(folder / "config.yaml"), "--checkpoint", str(folder),
                   "--images", str(tmp_path / "imgs"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    saved = load_features(str(out))["images"]
    order = [int(p.split("rgb=")[1].split(";")[0][-7:-4]) for p in saved["paths"]]
    extracted = torch.nn.functional.normalize(torch.from_numpy(saved["feat"]), dim=1)
    assert torch.allclose(extracted, feats[order], atol=1e-5)


def test_a_subset_of_a_concat_model_is_refused_not_filled_with_zeros(tmp_path):
    """The quickstart's concat fusion cannot represent RGB alone: 128 of 192 dimensions would be the
    same constant for every image. The extractor, run.py extract and export refuse it."""
    _, _, folder = tiny_model(tmp_path)
    paths = images(tmp_path)
    ex = FeatureExtractor(str(folder), device="cpu")
    with pytest.raises(ValueError, match=r"128 of its 192 dimensions.*model.modality_fusion=mean"):
        ex(paths["rgb"])
    r = run_python("run.py", "extract", "--config", str(folder / "config.yaml"), "--checkpoint", str(folder),
                   "--images", str(tmp_path / "imgs" / "rgb"), "--modality", "rgb", "--out", str(tmp_path / "x.npz"))
    assert r.returncode == 2 and "128 of its 192 dimensions" in r.stderr and not (tmp_path / "x.npz").exists()
    # a mean fusion represents any subset
    _, _, mean_folder = tiny_model(tmp_path / "mean", "model.modality_fusion=mean")
    assert FeatureExtractor(str(mean_folder), device="cpu")(paths["nir"], modality="nir").shape == (3, 64)


def test_extractor_without_camera_ids_uses_camera_0_and_says_so_once(tmp_path, caplog):
    _, _, folder = tiny_model(tmp_path, "model.modality_fusion=mean", modalities=["rgb"])
    paths = images(tmp_path)["rgb"]
    ex = FeatureExtractor(str(folder), device="cpu")
    with caplog.at_level("WARNING"):
        a = ex(paths)
        ex(paths)
    assert sum("no cam_ids given" in r.message for r in caplog.records) == 1
    assert torch.equal(a, ex(paths, cam_ids=[0, 0, 0])) and not torch.equal(a, ex(paths, cam_ids=[1, 1, 1]))
    with pytest.raises(ValueError, match="cam_ids has 2 entries for 3 images"):
        ex(paths, cam_ids=[0, 1])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_and_the_extractor(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    _, _, folder = tiny_model(tmp_path, "model.modality_fusion=mean")
    r = run_python("run.py", "export", str(folder), "--format", fmt, "--modalities", "rgb+nir+tir", "rgb")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((folder / "export" / "export.json").read_text())
    assert set(report["graphs"]) == {"rgb+nir+tir", "rgb"}
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())
    assert report["graphs"]["rgb"]["inputs"] == ["rgb", "cam_ids"]
    # the graph of every modality, run on a batch of 5 (not the export's 2), equals the extractor
    paths = images(tmp_path, n=5)
    ex = FeatureExtractor(str(folder), device="cpu")
    expected = ex(paths, cam_ids=[0, 1, 2, 0, 1])
    x = [torch.stack([ex._one(p, True) for p in paths[m]]) for m in MODS]
    cams = torch.tensor([0, 1, 2, 0, 1])
    path = report["graphs"]["rgb+nir+tir"]["path"]
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {**{m: t.numpy() for m, t in zip(MODS, x)}, "cam_ids": cams.numpy()})[0])
    else:
        got = torch.jit.load(path)(*x, cams)
    assert (got - expected).abs().max() < 1e-4


def test_export_refuses_what_the_fusion_cannot_represent(tmp_path):
    _, _, folder = tiny_model(tmp_path)
    r = run_python("run.py", "export", str(folder), "--format", "torchscript", "--modalities", "rgb")
    assert r.returncode == 2 and "128 of its 192 dimensions" in r.stderr


def test_the_forward_exports_with_torch_export(tmp_path):
    """No data-dependent Python branch on tensor values (the camera-id range check is left out while
    a graph is recorded)."""
    from hybrid_reid.export import FeatureGraph

    model, cfg, _ = tiny_model(tmp_path, "model.modality_fusion=mean")
    graph = FeatureGraph(model, MODS, "bn", cams=True, views=False).eval()
    args = tuple(graph.example(2, (64, 32), torch.Generator().manual_seed(0)))
    program = torch.export.export(graph, args, strict=False)
    check = tuple(graph.example(2, (64, 32), torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert torch.allclose(program.module()(*check), graph(*check), atol=1e-5)


def test_log_with_names_checked_and_missing_packages_named():
    import importlib.util

    with pytest.raises(ConfigError, match="train.log_with"):
        load_config(TINY, ["train.log_with=[tensorbord]"])
    from hybrid_reid.engine.train import _trackers
    from hybrid_reid.utils import MissingPackageError

    absent = next(t for t in ("aim", "clearml", "dvclive", "swanlab", "comet_ml", "mlflow", "wandb", "trackio")
                  if importlib.util.find_spec(t) is None)
    with pytest.raises(MissingPackageError, match=f"needs {absent}, which is not installed: pip install {absent}"):
        _trackers(load_config(TINY, [f"train.log_with=[csv, {absent}]"]))
    assert _trackers(load_config(TINY, ["train.log_with=[csv]"])) == []


def test_loss_and_map_curves_from_log_csv(tmp_path):
    from hybrid_reid.visualize import plot_curves

    log = tmp_path / "log.csv"
    log.write_text("epoch,step,lr,loss,mAP,rank1,rank5,rank10,mINP,epoch_time_s\n"
                   "1,6,0.001,5.1,,,,,,1.0\n2,12,0.002,4.0,30.5,40.1,60,70,20,1.1\n3,18,0.001,3.2,45.2,55.0,70,80,30,1.0\n")
    out = plot_curves(str(log), str(tmp_path / "curves.png"))
    with Image.open(out) as img:
        assert img.size == (1200, 456) and len(np.unique(np.asarray(img.convert("L")))) > 10
    (tmp_path / "empty.csv").write_text("epoch,step,lr,loss\n")
    with pytest.raises(ValueError, match="no epochs logged"):
        plot_curves(str(tmp_path / "empty.csv"), str(tmp_path / "x.png"))
