"""Typed configs (every shipped YAML validated and built), the CLI, and the backbone benchmark."""
import glob
import json
import os

import pytest
import torch
from conftest import ROOT, run_python

from hybrid_reid import ConfigError, build_model, load_config
from hybrid_reid.config import to_dict
from hybrid_reid.data import DATASETS, canonical_modality
from hybrid_reid.engine import build_optimizer
from hybrid_reid.losses import build_criterion

SUITES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.yaml")))  # run.py sweep suites
YAMLS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True) +
               [p for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True)
                if p not in SUITES])


def test_yaml_set_is_not_empty():
    assert len(YAMLS) >= 5


def _fingerprints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp", os.path.join(ROOT, "tests", "scripts", "model_fingerprints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(ROOT, "tests", "fixtures", "model_fingerprints.json")) as f:
        return module, json.load(f)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_yaml_loads_and_builds(path):
    """Every config builds, and builds the model it built before model.towers (state-dict names and
    shapes, tiny models' initial values, grids, camera embeddings: tests/scripts/model_fingerprints.py)."""
    cfg = load_config(path)
    modalities = [canonical_modality(m) for m in cfg.data.modalities]
    torch.manual_seed(0)
    model = build_model(cfg.model, load_pretrained=False, modalities=modalities)
    fp, before = _fingerprints()
    name = os.path.relpath(path, ROOT)
    if name in before:  # configs added since have nothing to compare with
        assert fp.fingerprint_of(model, cfg) == before[name]
    assert list(model.encoder.backbones) == list(cfg.model.towers) and model.modalities == modalities
    build_criterion(cfg.loss)  # everything train() builds from the config, short of reading the data
    build_optimizer(model, cfg.optim)
    assert cfg.data.name in DATASETS
    # the resolved config round-trips through a plain dict
    from hybrid_reid.config import Config, from_dict
    assert to_dict(from_dict(Config, to_dict(cfg))) == to_dict(cfg)


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {feat_dim: 128, clip: {sie_coef: 2.0}}\nseed: 3\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nmodel: {clip: {stride: 12}}\n")
    cfg = load_config(tmp_path / "b.yaml", ["model.feat_dim=256", "model.img_size=[224, 224]"])
    assert cfg.model.feat_dim == 256 and cfg.seed == 3
    assert cfg.model.clip.sie_coef == 2.0 and cfg.model.clip.stride == 12  # merged, not replaced
    assert cfg.model.clip.arch == "ViT-B-16-quickgelu"  # schema default kept
    assert cfg.model.img_size == (224, 224)
    # a partial tower section keeps that tower's own defaults (the timm ViT's, not TowerConfig's)
    vit = load_config(None, ["model.vit.stride=16"]).model.vit
    assert (vit.arch, vit.stride, vit.sie_mode, vit.sie_coef) == ("vit_base_patch16_224", 16, "all", 3.0)
    assert load_config(None, ["optim.group_lr={}"]).optim.group_lr == {}  # a mapping given is the mapping


@pytest.mark.parametrize("override, message", [
    ("model.backbon=clip", "unknown config key 'model.backbon'; did you mean 'model.backbone'"),
    ("model.clip.sie_cof=1", "did you mean 'model.clip.sie_coef'"),
    ("model.backbone=hybird", "model.backbone: 'hybird' is not one of .*did you mean 'hybrid'"),
    ("model.feat_dim=abc", "model.feat_dim: expected an integer, got str 'abc'"),
    ("model.multi_scale.enabled=1", "model.multi_scale.enabled: expected true/false"),
    ("model.img_size=[1, 2, 3]", "model.img_size: expected 2 values"),
    ("model.multi_scale.window_sizes=[4, x]", r"model.multi_scale.window_sizes\[1\]: expected an integer"),
    ("model.feat_dim=-1", "feat_dim must be positive"),
    ("model", "must look like key.sub=value"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [override])


def test_missing_config_file_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("_base_: y.yaml\n")
    (tmp_path / "y.yaml").write_text("_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "x.yaml")


def run_cli(*args):
    return run_python("run.py", *args)


def test_info_json_on_full_size_hybrid_without_weight_files():
    r = run_cli("info", "--config", "configs/hybrid.yaml", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    comps = info["components"]
    assert {"clip.tower", "clip.sie", "clip.multi_scale", "clip.projector", "vit.tower", "vit.sie",
            "vit.multi_scale", "vit.projector", "fusion", "head"} <= set(comps)
    assert all(set(c) >= {"params", "trainable"} for c in comps.values())
    assert info["total"] == sum(c["params"] for c in comps.values())
    assert info["grid"] == {"clip": [16, 8], "vit": [21, 10]}
    for t in ("clip", "vit"):
        assert comps[f"{t}.multi_scale"]["params"] / comps[f"{t}.tower"]["params"] <= 0.05
        assert 85_000_000 < comps[f"{t}.tower"]["params"] < 87_000_000
    assert comps["clip.projector"]["params"] == 768 * 512  # CLIP's own projection, counted once


def test_info_text_and_clear_errors():
    r = run_cli("info", "--config", "configs/tiny.yaml", "model.backbone=vit")
    assert r.returncode == 0, r.stderr
    assert "vit.multi_scale" in r.stdout and "grid[vit]: 5x2" in r.stdout and "% of the vit tower" in r.stdout
    r = run_cli("info", "--config", "configs/tiny.yaml", "model.fusoin=sum")
    assert r.returncode == 2 and "did you mean 'model.fusion'" in r.stderr and "Traceback" not in r.stderr


def test_bench_backbone_tiny_writes_json_and_markdown(tmp_path):
    r = run_cli("bench", "backbone", "--tiny", "--reps", "2", "--warmup", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "backbone.json").read_text())
    assert set(res["ratios"]) == {"adapter_clip / open_clip", "adapter_vit / timm", "adapter_vit / adapter_vit_tower",
                                  "timm / timm (A/A control)"}
    assert all(v > 0 for v in res["ratios"].values())
    assert all(v < 1e-4 for v in res["max_abs_diff"].values())
    assert "| adapter_clip / open_clip |" in (tmp_path / "backbone.md").read_text()


def test_bench_eval_compares_with_the_reference_loop_and_runs_the_msmt17_size(tmp_path):
    r = run_cli("bench", "eval", "--tiny", "--queries", "300", "--gallery", "2000", "--reps", "1", "--warmup", "0",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["setting"]["sizes"] == [[30, 200], [150, 700]] and res["setting"]["rerank_size"] == [30, 66]
    assert set(res["ratios"]) == {"evaluate_rank @30x200 / reference_loop @30x200",
                                  "evaluate_rank @150x700 / reference_loop @150x700",
                                  "re_ranking @30x66 / reference_re_ranking @30x66"}
    assert all(v < 1e-5 for v in res["max_abs_diff"].values())  # same numbers as the references
    msmt = res["figures"]["msmt17"]  # MSMT17 / 10 in a child process
    assert msmt["num_valid_queries"] > 1000 and 0 < msmt["mAP"] <= 1 and msmt["peak_rss_gb"] > 0
    assert "| msmt17 | value |" in (tmp_path / "eval.md").read_text()


@pytest.mark.parametrize("name, ratios, figure", [
    ("hybrid", {"hybrid / (clip + vit)", "hybrid_ms / hybrid", "clip / vit"}, "achieved_tflops_per_s"),
    ("mer", {"lora_tok / frozen_tok", "lora / frozen", "full / frozen", "merged / plain",
             "plain / plain (A/A control)", "unmerged / plain"}, "params"),
    ("data", set(), "loader_images_per_s"),
    ("mamba", {"scan_torch / scan_torch (A/A control)", "mamba / concat"}, "params"),
])
def test_bench_model_benchmarks_tiny(tmp_path, name, ratios, figure):
    r = run_cli("bench", name, "--tiny", "--reps", "2", "--warmup", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(res["ratios"]) == ratios and all(v > 0 for v in res["ratios"].values())
    assert res["figures"][figure]
    if name == "mer":  # merging the trained LoRA changes nothing but the speed
        assert res["max_abs_diff"]["merged vs unmerged LoRA (bn_feat)"] < 1e-4
        t = res["figures"]["params"]["trainable_m"]
        assert t["frozen"] < t["lora"] < t["full"] and res["figures"]["params"]["lora_m"] > 0
    if name == "mamba":  # without mamba-ssm on a GPU only the plain scan runs, and nothing is compared
        p = res["figures"]["params"]
        assert p["trainable_m (mamba)"] - p["trainable_m (concat)"] >= p["aggregation_m"] > 0
        if "not available here" in res["setting"]["kernel"]:
            assert res["max_abs_diff"] == {}
        else:  # mamba-ssm on a GPU: the kernel agrees with the plain scan
            assert all(v <= 1e-4 for v in res["max_abs_diff"].values())
    if name == "data":
        assert all(v > 0 for v in res["figures"]["loader_images_per_s"].values())
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# Benchmark: {name}")


def test_yaml_bare_no_is_read_back_as_the_word():
    """YAML 1.1 turns a bare `no` into False; a Literal field that expects the word gets it back."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["eval.metric=no"])


def test_every_shipped_suite_loads_and_each_has_a_tiny_form():
    from hybrid_reid.sweep import load_suite

    names = {os.path.basename(p)[:-5] for p in SUITES}
    for suite in ("backbone_ablation", "fusion_comparison", "module_ablation", "modality_ablation"):
        assert suite in names and f"{suite}-tiny" in names
    for path in SUITES:
        suite, base, runs = load_suite(path)  # every run's config is validated
        assert len(runs) == len(suite.variants) * len(suite.seeds or [0])
        if path.endswith("-tiny.yaml"):  # the tiny forms also build
            for run in runs:
                cfg = load_config(base, run.overrides)
                mods = [canonical_modality(m) for m in cfg.data.modalities]
                build_model(cfg.model, load_pretrained=False, modalities=mods)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_gpu_without_a_gpu_says_so_and_exits_2(tmp_path):
    r = run_cli("bench", "gpu", "--out", str(tmp_path))
    assert r.returncode == 2 and "no GPU on this machine" in r.stderr and "--device cpu --tiny" in r.stderr
    assert not list(tmp_path.iterdir())


def test_bench_gpu_tiny_on_cpu_runs_the_same_code(tmp_path):
    # the hybrid runs both towers; the three models are measured by the committed CPU run (README, Performance)
    r = run_cli("bench", "gpu", "--device", "cpu", "--tiny", "--batch", "8", "--reps", "1", "--warmup", "1",
                "--workers", "0", "--backbones", "clip", "hybrid", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "gpu.json").read_text())
    runs = {f"{b}{c}" for b in ("clip", "hybrid") for c in ("", "+compile", "+deterministic")}
    assert set(res["figures"]["images_per_s"]) == runs and all(v > 0 for v in res["figures"]["images_per_s"].values())
    assert set(res["ratios"]) == {f"{b}{c} / {b}" for b in ("clip", "hybrid") for c in ("+compile", "+deterministic")}
    assert "partial" not in res
    flops = res["figures"]["tflops_per_step"]
    assert flops["hybrid"] > flops["clip"] > 0 and flops["hybrid"] == flops["hybrid+compile"]
    assert res["figures"]["loader_images_per_s"]["workers=0"] > 0
    assert "mfu" not in res["figures"] and res["setting"]["precision"] == "fp32"  # no peak rate for a CPU
    assert "| hybrid+compile / hybrid |" in (tmp_path / "gpu.md").read_text()


def test_bench_gpu_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    from hybrid_reid import bench

    def killed(*a, **k):  # the run stops where the loader figure would be measured
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_loader_rate", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark("gpu", out_dir=str(tmp_path), device="cpu", tiny=True, batch=4, reps=1, warmup=1,
                            backbones=("clip",))
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["partial"] is True and set(res["figures"]["images_per_s"]) == {"clip", "clip+deterministic",
                                                                              "clip+compile"}
    assert "loader_images_per_s" not in res["figures"] and "Partial" in (tmp_path / "gpu.md").read_text()
    assert not torch.are_deterministic_algorithms_enabled()  # the switches are restored after the timing
