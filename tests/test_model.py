"""Multi-scale on every tower and grid, the shared space, every tower fusion, modalities and their fusion."""
import pytest
import torch
import torch.nn.functional as F

from hybrid_reid import build_model, load_config
from hybrid_reid.engine import build_optimizer
from hybrid_reid.models import FUSIONS, MODALITY_FUSIONS, MultiScaleExtractor, ReIDEncoder, create_backbone
from hybrid_reid.models.multi_scale import window_shapes

TINY_CFG = "configs/tiny.yaml"


def tiny_model(*overrides, num_classes=5, modalities=("rgb",)):
    cfg = load_config(TINY_CFG, [f"model.num_classes={num_classes}", *overrides])
    return build_model(cfg.model, modalities=modalities), cfg


def test_windows_clamp_to_the_grid():
    assert window_shapes((16, 8), [4, 8, 16], 0.5) == [((4, 4), (2, 2)), ((8, 8), (4, 4)), ((16, 8), (8, 4))]
    assert window_shapes((21, 10), [4, 8, 16], 1.0) == [((4, 4), (4, 4)), ((8, 8), (8, 8)), ((16, 10), (16, 10))]
    assert window_shapes((2, 1), [4], 0.5) == [((2, 1), (1, 1))]


# (img_size, stride) -> grid: 16x8, 21x10 (TransReID overlap), 14x14 (square 224)
GRIDS = {(16, 8): ([256, 128], None), (21, 10): ([256, 128], 12), (14, 14): ([224, 224], None)}


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_multi_scale_runs_and_learns_on_every_tower_and_grid(backbone, grid):
    size, stride = GRIDS[grid]
    model, cfg = tiny_model(f"model.backbone={backbone}", f"model.img_size={size}",
                            f"model.clip.stride={stride or 'null'}", f"model.vit.stride={stride or 'null'}",
                            "model.multi_scale.enabled=true")
    for t in cfg.model.towers:
        assert model.encoder.backbones[t].grid == grid
        ms = model.encoder.multi_scale[t]
        torch.nn.init.normal_(ms.mlp[-1].weight, std=0.02)  # past the zero init: every part must matter
    x = torch.randn(4, 3, *size)
    out = model(x, cam_ids=torch.tensor([0, 1, 2, 5]))
    assert out.feat.shape == (4, 64) and out.logits.shape == (4, 5)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    for t in cfg.model.towers:
        for name, p in model.encoder.multi_scale[t].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{t}.multi_scale.{name} got no gradient"


def test_untrained_multi_scale_leaves_the_cls_unchanged_and_is_added_to_it():
    torch.manual_seed(0)
    plain, _ = tiny_model("model.backbone=vit", "model.multi_scale.enabled=false")
    torch.manual_seed(0)
    with_ms, _ = tiny_model("model.backbone=vit", "model.multi_scale.enabled=true")
    with_ms.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), with_ms.eval()
    x, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(plain(x, cams).feat, with_ms(x, cams).feat)  # zero-initialised output layer
        ms = with_ms.encoder.multi_scale["vit"]
        torch.nn.init.normal_(ms.mlp[-1].weight)
        out = with_ms(x, cams)
        bb = with_ms.encoder.backbones["vit"](x, cams)
        expected = with_ms.encoder.projector("vit")(bb.cls + ms(bb.patches, bb.grid))
    assert torch.allclose(out.feat, expected, atol=1e-6)


def test_multi_scale_is_a_few_permille_of_a_vit_b16_and_any_width_works():
    ms = MultiScaleExtractor(768)
    assert sum(p.numel() for p in ms.parameters()) / 85_809_408 < 0.05
    for d in (32, 512, 1024):
        assert MultiScaleExtractor(d)(torch.randn(2, 12, d), (4, 3)).shape == (2, d)
    with pytest.raises(ValueError, match="do not form the grid"):
        ms(torch.randn(1, 10, 768), (4, 3))


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_trains_one_step_and_changes_the_output(fusion):
    torch.manual_seed(0)
    model, _ = tiny_model("model.backbone=hybrid", f"model.fusion={fusion}")
    x, pids = torch.randn(8, 3, 64, 32), torch.arange(8) % 5
    cams = torch.arange(8) % 6
    model.eval()
    with torch.no_grad():
        before = model(x, cams).bn_feat.clone()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(x, cams)
    loss = F.cross_entropy(out.logits, pids)
    assert torch.isfinite(loss)
    loss.backward()
    if fusion not in ("sum", "mean"):  # no parameters
        grads = [p.grad for p in model.encoder.fusion.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x, cams).bn_feat
    assert after.shape == (8, 64) and torch.isfinite(after).all()
    assert not torch.allclose(before, after)


def test_fusions_take_any_number_of_towers_and_start_as_the_mean():
    feats = {t: torch.randn(3, 16) for t in "abc"}
    tokens = {t: torch.randn(3, 5, 16) for t in "abc"}
    mean = torch.stack(list(feats.values())).mean(0)
    for name in ("concat", "gated", "cross_attn"):
        fusion = FUSIONS.get(name)(towers=list("abc"), dim=16, **({"heads": 4} if name == "cross_attn" else {}))
        assert torch.allclose(fusion(feats, tokens), mean, atol=1e-6), name
    assert torch.allclose(FUSIONS.get("sum")(list("abc"), 16)(feats), mean * 3, atol=1e-6)
    assert torch.allclose(FUSIONS.get("mean")(list("abc"), 16)(feats), mean, atol=1e-6)


def test_hybrid_feeds_each_tower_its_own_normalisation():
    """Input normalised for CLIP; the ViT tower (mean=std=0.5) must see (raw - 0.5) / 0.5."""
    model, _ = tiny_model("model.backbone=hybrid")
    enc: ReIDEncoder = model.encoder
    raw = torch.rand(2, 3, 64, 32)
    m, s = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
    x = (raw - m) / s
    assert torch.allclose(enc._input_for("vit", x), (raw - 0.5) / 0.5, atol=1e-5)
    assert enc._input_for("clip", x) is x


def test_clip_projection_is_reused_only_when_widths_match():
    model, _ = tiny_model("model.backbone=clip")  # out_dim 64 == feat_dim 64
    enc = model.encoder
    assert enc.projector("clip") is enc.backbones["clip"].proj and "clip" not in enc.projectors
    model, _ = tiny_model("model.backbone=clip", "model.feat_dim=32")
    assert model.encoder.projector("clip").out_features == 32
    model, _ = tiny_model("model.backbone=clip", "model.reuse_clip_proj=false")
    assert "clip" in model.encoder.projectors


def test_backbone_signature_is_the_same_for_both_towers():
    for kind, arch in (("clip", "ViT-B-16-quickgelu"), ("vit", "vit_base_patch16_224")):
        b = create_backbone(kind, arch=arch, img_size=(64, 32), num_cams=2, width=32, layers=1, heads=2)
        out = b(torch.randn(2, 3, 64, 32), cam_ids=torch.tensor([0, 1]), view_ids=None)
        assert out.cls.shape == (2, 32) and out.patches.shape == (2, 8, 32) and out.grid == (4, 2)


def test_bad_fusion_names_the_key():
    with pytest.raises(ValueError, match="model.fusion: unknown fusion 'gate'.*Did you mean 'gated'"):
        tiny_model("model.backbone=hybrid", "model.fusion=gate")
    with pytest.raises(ValueError, match="model.fusion_kwargs for 'concat'"):
        tiny_model("model.backbone=hybrid", "model.fusion_kwargs={heads: 2}")


MODS = ("rgb", "nir", "tir")


@pytest.mark.parametrize("mfusion,width", [("concat", 3 * 64), ("mean", 64)])
def test_modalities_share_the_encoder_and_are_fused(mfusion, width):
    torch.manual_seed(0)
    model, _ = tiny_model("model.backbone=hybrid", f"model.modality_fusion={mfusion}", modalities=MODS)
    model.eval()
    images = {m: torch.randn(4, 3, 64, 32) for m in MODS}
    cams = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = model(images, cams)
        assert out.feat.shape == out.bn_feat.shape == (4, width) and out.logits.shape == (4, 5)
        assert set(out.modality_feats) == set(out.encoder) == set(MODS)
        for m in MODS:  # the batched pass equals running the encoder on each modality alone
            alone = model.encoder(images[m], cams)
            assert torch.allclose(out.modality_feats[m], alone.feat, atol=1e-5)
            assert torch.allclose(out.encoder[m].towers["vit"].patches, alone.towers["vit"].patches, atol=1e-5)
        expected = model.modality_fusion({m: model.encoder(images[m], cams) for m in MODS})
        assert torch.allclose(out.feat, expected.feat, atol=1e-5) and not expected.extra and not expected.losses
        partial = model({"rgb": images["rgb"], "tir": images["tir"]}, cams)  # a modality missing
        assert partial.feat.shape == (4, width)
        if mfusion == "concat":  # the missing modality's slot is zero
            assert torch.equal(partial.feat[:, 64:128], torch.zeros(4, 64))
    with pytest.raises(ValueError, match="pass images as a dict"):
        model(images["rgb"], cams)
    with pytest.raises(ValueError, match=r"modalities \['sketch'\] given"):
        model({"sketch": images["rgb"]}, cams)


def test_modality_fusion_registry_and_errors():
    assert {"concat", "mean"} <= set(MODALITY_FUSIONS.names())
    with pytest.raises(ValueError, match="model.modality_fusion: unknown modality fusion 'cat'"):
        tiny_model("model.modality_fusion=cat", modalities=MODS)


def test_param_groups_cover_every_trainable_parameter_once():
    model, cfg = tiny_model("model.backbone=hybrid", "model.num_cams=3", modalities=MODS)
    groups = model.param_groups()
    names = [n for ps in groups.values() for n, _ in ps]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(set(names)) == len(names)
    assert all(".tower." in n for n, _ in groups["backbone"]) and groups["backbone"]
    assert {n.split(".")[0] for n, _ in groups["head"]} == {"head"}
    assert any(".sie." in n for n, _ in groups["other"]) and any("multi_scale" in n for n, _ in groups["other"])
    opt = build_optimizer(model, load_config(TINY_CFG, ["optim.group_lr={backbone: 1e-5}", "optim.lr=3e-4"]).optim)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["backbone"] == (1e-5, cfg.optim.weight_decay) and lrs["backbone.no_decay"] == (1e-5, 0.0)
    assert lrs["head.no_decay"][0] == 3e-4 and "head" in lrs  # BNNeck weight (1-d) has no decay, classifier has
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in model.named_parameters():
        if n.endswith(("pos_embed", "cls_token", ".bias")) and p.requires_grad:
            assert id(p) in no_decay, n
    with pytest.raises(ValueError, match="optim.group_lr: unknown group 'towers'"):
        build_optimizer(model, load_config(TINY_CFG, ["optim.group_lr={towers: 1e-5}"]).optim)
