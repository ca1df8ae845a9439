"""SDM, the RGB-anchored alignment loss and the stabilised CLIP consistency loss."""
from types import SimpleNamespace

import pytest
import torch

from hybrid_reid import build_model, load_config
from hybrid_reid.config import ConfigError
from hybrid_reid.engine import build_optimizer
from hybrid_reid.losses import LOSSES, ClipConsistencyLoss, build_criterion, scheduled_weight

MODS = ["rgb", "nir", "tir"]


def sdm_model(backbone="hybrid", *extra):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", [f"model.backbone={backbone}", "model.sdm.enabled=true",
                                            "model.sdm.semantic_dim=32", "model.num_classes=4", "model.num_cams=0",
                                            *extra])
    return build_model(cfg.model, modalities=MODS), cfg


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
def test_sdm_gives_semantic_features_and_the_alignment_loss_falls(backbone):
    model, cfg = sdm_model(backbone, "model.mer.enabled=true")
    crit = build_criterion({"sdm": {"weight": 1.0, "temperature": 0.1, "margin": 0.3}})
    opt = build_optimizer(model, load_config("configs/tiny.yaml", ["optim.lr=1e-3", "optim.group_lr={}"]).optim)
    g = torch.Generator().manual_seed(0)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    base = torch.randn(4, 3, 64, 32, generator=g)[pids]  # two views of each identity
    images = {m: base + 0.5 * torch.randn(8, 3, 64, 32, generator=g) for m in MODS}
    losses = []
    for _ in range(15):
        out = model(images)
        assert {m: s.shape for m, s in out.semantic.items()} == {m: (8, 32) for m in MODS}
        loss = crit(out, pids)
        assert set(loss) == {"sdm", "total"}
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(loss["sdm"].item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_alignment_is_skipped_without_sdm_or_rgb_and_matches_a_direct_computation():
    crit = build_criterion({"id": {"weight": 1.0}, "sdm": {"weight": 0.1}})
    out = SimpleNamespace(logits=torch.randn(4, 3), feat=torch.randn(4, 8), semantic=None)
    assert set(crit(out, torch.tensor([0, 1, 2, 0]))) == {"id", "total"}
    sem = {"rgb": torch.randn(4, 8), "nir": torch.randn(4, 8)}
    pids = torch.tensor([0, 0, 1, 1])
    loss = LOSSES.get("sdm")(temperature=0.1, margin=0.3)(SimpleNamespace(semantic=sem), pids)
    q = torch.nn.functional.normalize(sem["nir"], dim=1)
    a = torch.nn.functional.normalize(sem["rgb"], dim=1)
    pos = pids[:, None] == pids[None]
    logits = (q @ a.t() - 0.3 * pos) / 0.1
    expected = -torch.log((logits.exp() * pos).sum(1) / logits.exp().sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert LOSSES.get("sdm")()(SimpleNamespace(semantic={"nir": sem["nir"], "tir": sem["rgb"]}), pids) is None


@pytest.mark.parametrize("case", ["huge", "identical", "zeros", "opposite"])
def test_clip_consistency_gradient_stays_finite_on_adversarial_inputs(case):
    torch.manual_seed(0)
    f = {"huge": torch.randn(8, 16) * 1e4, "identical": torch.ones(8, 16), "zeros": torch.zeros(8, 16),
         "opposite": -torch.ones(8, 16) * 1e4}[case]
    c = {"huge": torch.randn(8, 16) * 1e4, "identical": torch.ones(8, 16), "zeros": torch.zeros(8, 16),
         "opposite": torch.ones(8, 16) * 1e4}[case]
    f, c = f.requires_grad_(), c.requires_grad_()
    cfg = load_config("configs/tiny.yaml", ["model.clip_consistency.weight=1",
                                            "model.clip_consistency.temperature=0.01",
                                            "model.clip_consistency.gradient_flow_ratio=0.5",
                                            "model.clip_consistency.schedule=[[0, 1.0]]"])
    crit = build_criterion({"id": {"weight": 0}, "triplet": {"weight": 0}}, cfg.model.clip_consistency)
    loss = crit(SimpleNamespace(consistency_feat=f, clip_global=c, feat=f), torch.zeros(8))["total"]
    loss.backward()
    assert torch.isfinite(loss) and loss.item() <= 10.0001  # the worst case, -logsigmoid(-1 / 0.1) = 10.00005
    for g in (f.grad, c.grad):
        assert g is not None and torch.isfinite(g).all() and g.norm() < 1e3
    assert ClipConsistencyLoss(temperature=0.01).temperature == 0.1  # the floor


def test_clip_consistency_schedule_gradient_flow_and_wiring():
    at = scheduled_weight(0.01, [(0, 0.0), (10, 0.1), (20, 1.0)])
    assert [at(e) for e in (0, 9, 10, 19, 20, 50)] == [0.0, 0.0, pytest.approx(0.001), pytest.approx(0.001), 0.01, 0.01]
    f, c = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    ClipConsistencyLoss(gradient_flow_ratio=0.0)(SimpleNamespace(consistency_feat=f, clip_global=c), None).backward()
    assert c.grad is None or c.grad.abs().sum() == 0  # ratio 0: CLIP is a fixed target
    for backbone in ("clip", "vit", "hybrid"):  # a frozen CLIP beside any backbone
        model, cfg = sdm_model(backbone, "model.clip_consistency.weight=0.01", "model.feat_dim=48")
        assert not any("_clip_teacher" in n for n in model.state_dict())  # not saved, not optimised
        out = model({m: torch.randn(2, 3, 64, 32) for m in MODS})
        assert out.clip_global.shape == out.consistency_feat.shape == (2, 64)  # tiny CLIP out_dim 64
        crit = build_criterion(cfg.loss, cfg.model.clip_consistency)
        assert "clip_consistency" not in crit(out, torch.tensor([0, 1]), epoch=0)
        losses = crit(out, torch.tensor([0, 1]), epoch=25)
        losses["clip_consistency"].backward()
        assert model.consistency_head.weight.grad is not None
        model.eval()
        assert model({m: torch.randn(2, 3, 64, 32) for m in MODS}).clip_global is None  # training only
    with pytest.raises(ConfigError, match="gradient_flow_ratio"):
        load_config("configs/tiny.yaml", ["model.clip_consistency.gradient_flow_ratio=2"])
