"""Towers as data: model.towers and its shorthand, every ViT family (DINOv2, SigLIP, EVA-02, DeiT
distilled) behind the adapter, the weight files users have (each trap built here in its peer's
layout), modalities and protocols as registries."""
import json
import logging
import os

import pytest
import timm
import torch
import yaml
from conftest import ROOT

from hybrid_reid import build_model, create_backbone, load_config
from hybrid_reid.config import ConfigError, to_dict
from hybrid_reid.models import CheckpointError

TINY = dict(width=64, layers=2, heads=2)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------------- config: towers

def test_towers_mapping_and_shorthand_rules(tmp_path):
    q = os.path.join(ROOT, "configs", "quickstart.yaml")
    short = load_config(q)
    assert list(short.model.towers) == ["clip", "vit"] and short.model.label == "hybrid"
    # a file whose base uses the shorthand gets exactly the towers it lists
    dino = {"arch": "vit_small_patch14_reg4_dinov2", "tower_kwargs": TINY}
    child = write(tmp_path, "child.yaml", {"_base_": q, "model": {"towers": {"clip": {"arch": "ViT-B-16-quickgelu",
                                                                                        "tower_kwargs": TINY},
                                                                               "dino": dino}}})
    cfg = load_config(child)
    assert list(cfg.model.towers) == ["clip", "dino"] and cfg.model.label == "clip+dino"
    assert cfg.model.towers["dino"].arch == "vit_small_patch14_reg4_dinov2"
    assert cfg.model.multi_scale.enabled  # everything else still inherited
    # both in one file: an error naming the two keys
    both = write(tmp_path, "both.yaml", {"model": {"backbone": "vit", "towers": {"dino": dino}}})
    with pytest.raises(ConfigError, match=r"both\.yaml sets both model\.towers and model\.backbone"):
        load_config(both)
    # the shorthand over inherited towers: model.backbone switches back, model.clip alone is refused
    assert list(load_config(child, ["model.backbone=vit"]).model.towers) == ["vit"]
    with pytest.raises(ConfigError, match=r"sets model\.clip, but this config lists its towers in model\.towers"):
        load_config(child, ["model.clip.pretrained=x.pt"])
    # dotted overrides edit one tower; a whole mapping replaces them all
    edited = load_config(child, ["model.towers.dino.stride=7"])
    assert edited.model.towers["dino"].stride == 7 and list(edited.model.towers) == ["clip", "dino"]
    replaced = load_config(child, ['model.towers={"vit": {"arch": "vit_base_patch16_224", "tower_kwargs": {}}}'])
    assert list(replaced.model.towers) == ["vit"]
    with pytest.raises(ConfigError, match="there is no tower 'siglip'"):
        load_config(child, ["model.towers.siglip.stride=16"])
    with pytest.raises(ConfigError, match=r"model\.towers\.dino needs an arch"):
        load_config(write(tmp_path, "noarch.yaml", {"model": {"towers": {"dino": {"stride": 14}}}}))
    # the resolved config holds the towers only, and loads back to the same model
    dumped = to_dict(cfg)
    assert "backbone" not in dumped["model"] and "clip" not in dumped["model"] and "dino" in dumped["model"]["towers"]
    again = load_config(write(tmp_path, "resolved.yaml", dumped))
    assert again.model.towers == cfg.model.towers and to_dict(again) == dumped


def test_every_tiny_suite_variant_builds_the_model_it_built_before():
    """As test_config_cli's per-config check, for every variant of the tiny sweep suites (the full-size
    suites' variants were checked by running tests/scripts/model_fingerprints.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp", os.path.join(ROOT, "tests", "scripts", "model_fingerprints.py"))
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    with open(os.path.join(ROOT, "tests", "fixtures", "model_fingerprints.json")) as f:
        before = json.load(f)
    checked = 0
    for name, path, overrides in fp.configs():
        if "-tiny.yaml:" in name and name in before:  # suites added since have nothing to compare with
            assert fp.fingerprint(path, overrides) == before[name], name
            checked += 1
    assert checked >= 20


def test_imagenet_vit_towers_default_to_drop_path_0_1_and_the_quickstart_keeps_0():
    from hybrid_reid.config import load_config as lc

    assert lc(os.path.join(ROOT, "configs", "rgbnt201_vit.yaml")).model.towers["vit"].drop_path == 0.1
    assert lc(None).model.vit.drop_path == 0.1
    assert lc(os.path.join(ROOT, "configs", "quickstart.yaml")).model.towers["vit"].drop_path == 0.0
    vit = build_model(lc(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.backbone=vit",
                                                                        "model.vit.drop_path=0.1"]).model)
    rates = [b.drop_path1.drop_prob for b in vit.encoder.backbones["vit"].tower.blocks
             if hasattr(b.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------- families

def family_tower(arch, **kw):
    size = (56, 28) if "14" in arch else (64, 32)
    return create_backbone("vit", arch=arch, img_size=size, **{**TINY, **kw}), size


@pytest.mark.parametrize("arch, family, pool, prefix", [
    ("vit_small_patch14_reg4_dinov2", "vit", "cls", 5),
    ("vit_base_patch16_siglip_256", "vit", "map", 0),
    ("eva02_small_patch14_224", "eva", "cls", 1),
    ("deit_tiny_distilled_patch16_224", "deit_distilled", "cls+dist", 2),
])
def test_every_family_gives_its_own_global_token(arch, family, pool, prefix):
    torch.manual_seed(0)
    b, size = family_tower(arch)
    b.eval()
    assert (b.family.name, b.pool, b.num_prefix_tokens) == (family, pool, prefix)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = b(x)
        tokens = b.tower.forward_features(x)
        # timm's own pre-logits feature is the family's global token (class token, DeiT's mean of
        # class and distillation tokens, SigLIP's attention pool)
        if family == "eva":
            expected = tokens[:, 0]
        else:
            expected = b.tower.forward_head(tokens, pre_logits=True)
    assert torch.allclose(out.cls, expected, atol=1e-6)
    grid = (size[0] // (14 if "14" in arch else 16), size[1] // (14 if "14" in arch else 16))
    assert out.grid == grid and out.patches.shape == (2, grid[0] * grid[1], 64)  # registers etc. excluded
    assert torch.equal(out.patches, tokens[:, prefix:])


def test_siglip_has_no_class_token_and_refuses_cls_camera_embedding():
    with pytest.raises(ValueError, match="sie_mode: cls .* has no class token"):
        family_tower("vit_base_patch16_siglip_256", num_cams=3, sie_mode="cls")
    with pytest.raises(ValueError, match="global_pool: cls, but .* has no class token; use map"):
        family_tower("vit_base_patch16_siglip_256", global_pool="cls")
    b, size = family_tower("vit_base_patch16_siglip_256", num_cams=3, sie_mode="all", global_pool="avg")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, c = b(x, cam_ids=torch.tensor([0, 0])), b(x, cam_ids=torch.tensor([1, 1]))
    assert not torch.equal(a.cls, c.cls) and torch.allclose(a.cls, a.patches.mean(1))


def test_deit_distillation_token_averaged_or_dropped():
    torch.manual_seed(0)
    avg, size = family_tower("deit_tiny_distilled_patch16_224")
    drop = create_backbone("vit", arch="deit_tiny_distilled_patch16_224", img_size=size, distill_token="drop", **TINY)
    drop.load_state_dict(avg.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        tokens = avg.tower.forward_features(x)
        assert torch.allclose(avg(x).cls, (tokens[:, 0] + tokens[:, 1]) / 2)
        assert torch.equal(drop(x).cls, tokens[:, 0])


def test_camera_embedding_reaches_every_family_right_after_the_positional_embedding():
    for arch in ("vit_small_patch14_reg4_dinov2", "eva02_small_patch14_224", "deit_tiny_distilled_patch16_224",
                 "vit_base_patch16_siglip_256"):
        torch.manual_seed(0)
        b, size = family_tower(arch, num_cams=2, sie_mode="all")
        seen = {}
        h = b.tower.pos_drop.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            b(x, cam_ids=torch.tensor([1]))
            b.sie.table.zero_()
            seen_plain = {}
            h.remove()
            h = b.tower.pos_drop.register_forward_hook(lambda m, i, o: seen_plain.setdefault("x", o.detach()))
            b(x, cam_ids=torch.tensor([1]))
        h.remove()
        # the difference is the camera row on every token (prefix tokens included), added once
        diff = seen["x"] - seen_plain["x"]
        assert diff.abs().max() > 0, arch
        assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-6), arch


def test_eva_lora_experts_are_applied_not_bypassed():
    """EVA's fused-bias attention reads ``qkv.weight`` past any wrapper; the family makes it call
    the layer, so the experts change the output (and start as a no-op)."""
    torch.manual_seed(0)
    b, size = family_tower("eva02_small_patch14_224")
    b.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = b(x).cls
        b.experts.add_lora(["rgb", "nir"], rank=2)
        assert torch.allclose(b(x, modality="rgb").cls, ref, atol=1e-5)  # B = 0
        names = [n for n, _ in b.tower.named_parameters() if "lora_B.nir" in n]
        assert any(".attn.qkv." in n for n in names) and any(".mlp.fc1_g." in n or ".mlp.fc1." in n for n in names)
        for n, p in b.tower.named_parameters():
            if "lora_B.nir" in n and ".attn.qkv." in n:
                p.normal_()
        assert torch.allclose(b(x, modality="rgb").cls, ref, atol=1e-5)
        assert not torch.allclose(b(x, modality="nir").cls, ref, atol=1e-3)  # the qkv expert is used
    with pytest.raises(ValueError, match="stride 12: the eva family"):
        family_tower("eva02_small_patch14_224", stride=12)


def test_info_lists_towers_by_name(tmp_path):
    from conftest import run_python

    cfg = write(tmp_path, "three.yaml", {"_base_": os.path.join(ROOT, "configs", "quickstart.yaml"), "model": {
        "towers": {"clip": {"arch": "ViT-B-16-quickgelu", "tower_kwargs": {**TINY, "out_dim": 64}},
                   "vit": {"arch": "vit_base_patch16_224", "tower_kwargs": TINY},
                   "dino": {"arch": "vit_small_patch14_reg4_dinov2", "tower_kwargs": TINY}}}})
    r = run_python("run.py", "info", "--config", str(cfg), "model.img_size=[56,28]")
    assert r.returncode == 0, r.stderr
    assert "towers: clip, vit, dino (backbone clip+vit+dino)" in r.stdout
    assert "grid[dino]: 4x2 (arch vit_small_patch14_reg4_dinov2, stride patch, family vit, global token cls)" \
        in r.stdout
    assert "dino.tower" in r.stdout and "dino.projector" in r.stdout


# ----------------------------------------------------------------------------------- weight traps

def tiny_clip(**kw):
    return create_backbone("clip", arch=kw.pop("arch", "ViT-B-16-quickgelu"), img_size=(224, 224),
                           out_dim=32, **{**TINY, **kw})


def test_openai_weights_into_a_gelu_tower_are_refused_or_warned(clip_torchscript, clip_ckpt, caplog):
    with pytest.raises(CheckpointError, match="OpenAI's TorchScript CLIP archive, trained with QuickGELU.*"
                                              "ViT-B-16-quickgelu"):
        tiny_clip(arch="ViT-B-16", pretrained=clip_torchscript)
    with caplog.at_level(logging.WARNING):
        tiny_clip(arch="ViT-B-16", pretrained=clip_ckpt)  # a state dict cannot tell OpenAI from LAION
    assert any("need the -quickgelu arch" in r.message for r in caplog.records)
    tiny_clip(pretrained=clip_torchscript)  # the right arch loads


def _vit_state(seed=1):
    torch.manual_seed(seed)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=(64, 32),
                          embed_dim=64, depth=2, num_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.2)
    return m.state_dict()


def test_transreid_trained_camera_table_and_jpm_branch_load(tmp_path, caplog):
    sd = _vit_state()
    table = torch.randn(3 * 2, 1, 64)
    b1_block = {k.replace("blocks.1.", ""): torch.randn_like(v) for k, v in sd.items() if k.startswith("blocks.1.")}
    b1_norm = {k[len("norm."):]: torch.randn_like(v) for k, v in sd.items() if k.startswith("norm.")}
    trained = {f"base.{k}": v for k, v in sd.items()} | {"base.sie_embed": table}
    trained |= {f"b1.0.{k}": v for k, v in b1_block.items()} | {f"b1.1.{k}": v for k, v in b1_norm.items()}
    trained |= {"b2.0.norm1.weight": torch.ones(64), "classifier.weight": torch.zeros(10, 64),
                "bottleneck.weight": torch.ones(64)}
    path = tmp_path / "transformer_120.pth"
    torch.save(trained, path)
    with caplog.at_level(logging.INFO):
        b = create_backbone("vit", arch="vit_base_patch16_224", img_size=(64, 32), pretrained=str(path), num_cams=3,
                            num_views=2, **TINY)
    assert torch.equal(b.sie.table, table.flatten(1))  # the trained camera/view table, not a random one
    got = b.tower.state_dict()
    assert all(torch.equal(got[f"blocks.1.{k}"], v) for k, v in b1_block.items())  # b1, not base.blocks.1
    assert all(torch.equal(got[f"norm.{k}"], v) for k, v in b1_norm.items())
    assert torch.equal(got["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    text = " ".join(r.message for r in caplog.records)
    assert "loaded its trained camera table (6, 64)" in text and "trained global branch b1" in text
    assert "left unused" in text and "b2.0.norm1.weight" in text and "classifier.weight" in text
    with caplog.at_level(logging.WARNING):  # a table that does not fit is said so, and left random
        other = create_backbone("vit", arch="vit_base_patch16_224", img_size=(64, 32), pretrained=str(path),
                                num_cams=4, **TINY)
    assert not torch.equal(other.sie.table[:4], table.flatten(1)[:4])
    assert any("does not fit this model's (4, 64)" in r.message for r in caplog.records)


def test_deit_distilled_release_loads_into_the_distilled_family_and_is_named_otherwise(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, embed_dim=64, depth=2, num_heads=2)
    assert src.pos_embed.shape[1] == 198  # 14x14 + class + distillation token, as DeiT releases it
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(CheckpointError, match="distilled DeiT .*dist_token.*deit_base_distilled_patch16_224"):
        create_backbone("vit", arch="vit_base_patch16_224", pretrained=str(path), img_size=(64, 32), **TINY)
    b = create_backbone("vit", arch="deit_tiny_distilled_patch16_224", pretrained=str(path), img_size=(224, 224),
                        **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    src.eval()
    with torch.no_grad():
        assert torch.allclose(b(x).cls, src.forward_head(src.forward_features(x), pre_logits=True), atol=1e-6)


def _openai_visual(seed=0):
    from conftest import tiny_open_clip

    torch.manual_seed(seed)
    m = tiny_open_clip()
    with torch.no_grad():
        m.visual.class_embedding.normal_()
        m.visual.positional_embedding.normal_(std=0.5)
    return m, {k: v for k, v in m.state_dict().items() if k.startswith("visual.")}


def test_clip_reid_and_mambapro_trained_models_initialise_a_tower(tmp_path, caplog):
    ref_model, visual = _openai_visual()
    ref = tiny_clip(pretrained=None, num_cams=4)
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
    table = torch.randn(4, 64)
    clip_reid = {f"image_encoder.{k[len('visual.'):]}": v for k, v in visual.items()}
    clip_reid |= {"cv_embed": table, "text_encoder.positional_embedding": torch.zeros(8, 32),
                  "prompt_learner.cls_ctx": torch.zeros(10, 4, 32), "classifier.weight": torch.zeros(10, 32)}
    mambapro = {f"BACKBONE.base.{k[len('visual.'):]}": v for k, v in visual.items()}
    mambapro |= {"BACKBONE.cv_embed": table, "AAM.linear_reduction_r.1.weight": torch.zeros(32, 64),
                 "classifier_fuse.weight": torch.zeros(10, 96)}
    for i in range(2):  # MambaPro's per-block prompts and adapters sit inside the tower's blocks
        mambapro[f"BACKBONE.base.transformer.resblocks.{i}.adapter_prompt_rgb"] = torch.zeros(4, 64)
        mambapro[f"BACKBONE.base.transformer.resblocks.{i}.adapter_ffn.0.weight"] = torch.zeros(128, 64)
    plain = tmp_path / "plain.pth"
    torch.save(ref_model.state_dict(), plain)
    expected = tiny_clip(pretrained=str(plain), num_cams=4).eval()
    for name, sd in (("clip_reid", clip_reid), ("mambapro", {f"module.{k}": v for k, v in mambapro.items()})):
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            b = tiny_clip(pretrained=str(path), num_cams=4).eval()
        with torch.no_grad():
            cams = torch.tensor([0, 3])
            expected.sie.table.copy_(table)
            assert torch.allclose(b.embed(x, cams), expected.embed(x, cams), atol=1e-6), name
        assert torch.equal(b.sie.table, table), name
        text = " ".join(r.message for r in caplog.records)
        unused = [r.message for r in caplog.records if "left unused" in r.message]
        assert len(unused) == 1, name  # one log line lists them all
        assert ("prompt_learner.cls_ctx" in unused[0]) if name == "clip_reid" else ("adapter_prompt_rgb" in unused[0]
                                                                                       and "AAM." in unused[0])
        assert "loaded its trained camera table (4, 64)" in text
    del ref


# ----------------------------------------------------------------------------------- modalities, protocols

def test_a_new_modality_and_protocol_are_yaml_and_one_class(tmp_path):
    from hybrid_reid import modalities
    from hybrid_reid.engine.evaluator import PROTOCOLS, Protocol

    cfg = write(tmp_path, "depth.yaml", {"_base_": os.path.join(ROOT, "configs", "tiny.yaml"),
                                         "modalities": {"depth": {"channels": 1, "aliases": ["dp"], "short": "d"}},
                                         "data": {"modalities": ["rgb", "dp"], "modality_dirs": {"depth": "Depth"}},
                                         "model": {"tokenizers": {"enabled": True}, "num_classes": 3}})
    c = load_config(cfg)
    assert modalities.canonical("dp") == "depth" and modalities.get("depth").channels == 1
    assert modalities.short_name(["rgb", "depth"]) == "rd"
    model = build_model(c.model, modalities=["rgb", "depth"])
    tok = model.encoder.backbones["vit"].tower.patch_embed.embeds["depth"]
    assert tok.proj.in_channels == 1  # the declared channels
    out = model({"rgb": torch.randn(2, 3, 64, 32), "depth": torch.randn(2, 1, 64, 32)}, torch.tensor([0, 1]))
    assert out.feat.shape == (2, 128)

    @PROTOCOLS.register("market_no_filter_test")
    class NoFilter(Protocol):
        name = "market_no_filter_test"

    try:
        assert load_config(cfg, ["eval.protocol=market_no_filter_test"]).eval.protocol == "market_no_filter_test"
    finally:
        PROTOCOLS._entries.pop("market_no_filter_test")
    with pytest.raises(ConfigError, match=r"eval.protocol: 'markt' is not a registered protocol .*did you mean "
                                          r"'market'"):
        load_config(cfg, ["eval.protocol=markt"])


def test_a_sweep_varies_the_towers(tmp_path):
    from hybrid_reid.sweep import load_suite

    suite = write(tmp_path, "suite.yaml", {
        "base": os.path.join(ROOT, "configs", "quickstart.yaml"), "output_dir": str(tmp_path / "out"),
        "variants": {"hybrid": {"model.backbone": "hybrid"},
                     "dino": {"model.towers": {"dino": {"arch": "vit_small_patch14_reg4_dinov2",
                                                        "tower_kwargs": TINY}}},
                     "clip+dino": {"model.towers": {"clip": {"arch": "ViT-B-16-quickgelu", "tower_kwargs": TINY},
                                                    "dino": {"arch": "vit_small_patch14_reg4_dinov2",
                                                             "tower_kwargs": TINY}}}}})
    _, base, runs = load_suite(str(suite))
    towers = {r.variant: list(load_config(base, r.overrides).model.towers) for r in runs}
    assert towers == {"hybrid": ["clip", "vit"], "dino": ["dino"], "clip+dino": ["clip", "dino"]}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_three_towers_train_and_evaluate(tmp_path):
    from test_engine import tiny_overrides

    from hybrid_reid.engine import train

    out = tmp_path / "three"
    metrics = train(load_config(os.path.join(ROOT, "configs", "towers", "quickstart_three_towers.yaml"),
                                tiny_overrides(str(tmp_path / "data"), out, 1)))
    assert metrics["backbone"] == "clip+vit+dino" and 0 < metrics["mAP"] <= 100
    assert metrics["towers"] == {"clip": "ViT-B-16-quickgelu", "vit": "vit_base_patch16_224",
                                 "dino": "vit_small_patch14_reg4_dinov2"}
    resolved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert list(resolved["towers"]) == ["clip", "vit", "dino"] and "backbone" not in resolved
