"""DeMo (PIFE, HDM, ATMoE) held against the authors' code run on tiny random weights
(tests/fixtures/demo/README.md), its missing-modality features, and its checkpoints brought into this
project."""
import copy
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_python
from peers import THEIRS, close, their_checkpoint, their_inputs, their_state_dict, write_their_rgbnt201
from safetensors.torch import load_file

from hybrid_reid import build_model, load_config
from hybrid_reid.losses import build_criterion
from hybrid_reid.models.checkpoint import load_model_weights
from hybrid_reid.models.demo import DecouplingQuery, modality_subsets, quick_gelu

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "demo")
METHOD = os.path.join(ROOT, "configs", "methods", "demo.yaml")
CONFIG = {"clip": METHOD, "vit": os.path.join(ROOT, "configs", "methods", "demo_vit.yaml")}
MODS = ["rgb", "nir", "tir"]
SUBSETS = ["r", "n", "t", "rn", "rt", "nt", "rnt"]
F_DIM, HEADS = 64, 4  # the fixture's DeMo width and ATMoE heads (expert width 16)
# the fixture's tiny towers (their sizes, no pretrained file), otherwise the method's configs unchanged
TINY = {
    "clip": ["model.towers.clip.pretrained=null", "model.towers.clip.tower_kwargs={width: 64, layers: 2, heads: 2, "
             "out_dim: 64}", "model.feat_dim=64"],
    "vit": ["model.towers.vit.pretrained=null", "model.towers.vit.tower_kwargs={width: 64, layers: 2, heads: 2}",
            "model.feat_dim=64", "model.towers.vit.drop_path=0.0"],  # the fixture ran without stochastic depth
}
NO_DROPOUT = "model.modality_fusion_kwargs.attn_dropout=0.0"  # the fixture ran its HDM attention without dropout


def fixture(tower):
    return load_file(os.path.join(FIXTURES, f"demo_{tower}.safetensors"))


def model_for(tower, *extra, num_classes=5):
    cfg = load_config(CONFIG[tower], [*TINY[tower], f"model.num_classes={num_classes}", "model.num_cams=6", NO_DROPOUT,
                                      *extra])
    return build_model(cfg.model, modalities=MODS), cfg


@pytest.fixture(scope="module", params=["clip", "vit"])
def loaded(request, tmp_path_factory):
    tower = request.param
    fx = fixture(tower)
    model, cfg = model_for(tower)
    load_model_weights(model, their_checkpoint(fx, tmp_path_factory.mktemp("demo") / "theirs.pth"))
    return tower, fx, model.eval(), cfg


def test_tower_tokens_equal_theirs(loaded):
    """Every modality's class and patch tokens in DeMo's space (CLIP: after ln_post and the projection)."""
    tower, fx, model, _ = loaded
    with torch.no_grad():
        out = model(their_inputs(fx), fx["input.cam_label"])
    for m, t in THEIRS.items():
        p = out.encoder[m].projected[tower]
        assert close(p.cls, fx[f"inter.backbone.{t}.cls"]), m
        assert close(p.patches, fx[f"inter.backbone.{t}.patch_tokens"]), m


def test_pife_hdm_atmoe_equal_theirs(loaded):
    """Each part from its own stored input: PIFE from their tower tokens, HDM from their PIFE output and
    tokens (every decoupled feature and its attention map), ATMoE from their decoupled features (the
    gate query, the gates, every expert's output, the mixture)."""
    tower, fx, model, _ = loaded
    fusion = model.modality_fusion
    with torch.no_grad():
        for m, t in THEIRS.items():
            cls, patches = fx[f"inter.backbone.{t}.cls"], fx[f"inter.backbone.{t}.patch_tokens"]
            assert close(patches.mean(1), fx[f"inter.pife.{t}.local_pooled"])
            assert close(fusion.pife[m](cls, patches.mean(1)), fx[f"inter.pife.{t}.global_reduced"]), m
        tokens = {m: [fx[f"inter.pife.{t}.global_reduced"][:, None], fx[f"inter.backbone.{t}.patch_tokens"]]
                  for m, t in THEIRS.items()}
        for subset, name in zip(modality_subsets(MODS), SUBSETS):
            feat, attn = fusion.hdm.branches[name]([x for m in subset for x in tokens[m]], need_weights=True)
            assert close(feat, fx[f"inter.hdm.{name}"]), name
            assert close(attn.mean(1, keepdim=True), fx[f"inter.hdm.{name}.attn_weights"]), name
        assert close(fusion.hdm(tokens), torch.stack([fx[f"inter.hdm.{n}"] for n in SUBSETS], 1))
        decoupled = torch.stack([fx[f"inter.hdm.{n}"] for n in SUBSETS], dim=1)  # [B, 7, F]
        moe = fusion.moe
        reduced = moe.gate_norm(quick_gelu(moe.gate_reduce(decoupled.flatten(1))))
        assert close(reduced, fx["inter.atm.gate_query_reduced"])
        assert close(moe.gates(decoupled), fx["inter.atm.gates"][:, :, 0])  # [B, heads, 7]
        assert close(moe.experts(decoupled).permute(0, 2, 1, 3), fx["inter.atm.expert_out"])  # [B, heads, 7, d]
        assert close(moe(decoupled), fx["eval.pattern2"])


def test_whole_model_eval_feature_per_return_pattern(loaded):
    """Their three test features: 1 = ori, 2 = moe, 3 = [ori ; moe] (the default), as ``eval.feat: pre``
    ranks them (``ReIDOutput.test_feat``); the model's own feature is moe, ``ori`` its extra branch."""
    tower, fx, model, _ = loaded
    model = copy.deepcopy(model)
    assert model.modality_fusion.return_pattern == 3  # configs/methods/demo*.yaml
    for pattern in (1, 2, 3):
        model.modality_fusion.return_pattern = pattern
        with torch.no_grad():
            out = model(their_inputs(fx), fx["input.cam_label"])
        assert close(out.test_feat, fx[f"eval.pattern{pattern}"]), pattern
    assert close(out.feat, fx["eval.pattern2"]) and close(out.extra["ori"].feat, fx["eval.pattern1"])


def test_return_pattern_from_the_config_and_bad_values():
    model, _ = model_for("clip", "model.modality_fusion_kwargs.return_pattern=1")
    assert model.modality_fusion.return_pattern == 1
    with pytest.raises(ValueError, match="return_pattern must be one of"):
        model_for("clip", "model.modality_fusion_kwargs.return_pattern=4")
    with pytest.raises(ValueError, match=r"modality_fusion_kwargs for 'demo'.*heads_moe"):
        model_for("clip", "model.modality_fusion_kwargs.heads_moe=4")
    with pytest.raises(ValueError, match="not divisible by moe_heads=5"):
        model_for("clip", "model.modality_fusion_kwargs.moe_heads=5")


def _their_bn(fx, key):
    return fx[f"train.state_after.{key}"]


def test_one_training_step_equals_theirs(loaded):
    """DIRECT 1: the four outputs, the ATMoE in train mode (batch statistics), every loss (0.25 x
    label-smoothed CE + soft-margin triplet on moe and on ori, plus their auxiliary MoE loss, which is 0)
    and every BatchNorm's statistics after the step."""
    tower, fx, model, cfg = loaded
    model = copy.deepcopy(model).train()
    probe = copy.deepcopy(model.modality_fusion.moe).train()  # the ATMoE's train-mode parts, on a copy
    out = model(their_inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    assert close(out.feat, fx["train.moe_feat"]) and close(out.logits, fx["train.moe_score"])
    assert close(out.extra["ori"].feat, fx["train.ori"]) and close(out.extra["ori"].logits, fx["train.ori_score"])
    expected = {"id": 0.25 * fx["loss.moe.id"], "triplet": fx["loss.moe.tri"], "id.ori": 0.25 * fx["loss.ori.id"],
                "triplet.ori": fx["loss.ori.tri"], "moe_aux": fx["loss.moe_aux"], "total": fx["loss.total"]}
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert abs(losses[k].item() - float(v)) < 1e-5, k
    assert float(fx["loss.moe_aux"]) == 0.0 and float(losses["moe_aux"]) == 0.0
    decoupled = torch.stack([fx[f"inter.hdm.{n}"] for n in SUBSETS], dim=1)
    with torch.no_grad():
        assert close(probe.gates(decoupled), fx["inter.train.atm.gates"][:, :, 0])
        assert close(probe.experts(decoupled).permute(0, 2, 1, 3), fx["inter.train.atm.expert_out"])
    # BatchNorm statistics after the step: every expert's (slices of our one BatchNorm), the gate's, the heads'
    moe = model.modality_fusion.moe
    d = F_DIM // HEADS
    n = 0
    for key in fx:
        m = re.fullmatch(r"train\.state_after\.generalFusion\.moe\.experts\.(\d)\.expertHead\.(\d)\.mlp\.2\."
                         r"(running_\w+)", key)
        if m:
            h, j, stat = int(m[1]), int(m[2]), m[3]
            ours = getattr(moe.expert_norm, stat)[j * F_DIM + h * d:j * F_DIM + (h + 1) * d]
            assert close(ours, fx[key]), key
            n += 1
    assert n == 2 * 7 * HEADS
    gate = "generalFusion.moe.gating_network.gate.linear_re.2"
    for stat in ("running_mean", "running_var"):
        assert close(getattr(moe.gate_norm, stat), _their_bn(fx, f"{gate}.{stat}"))
        assert close(getattr(model.head.bnneck, stat), _their_bn(fx, f"bottleneck_moe.{stat}"))
        assert close(getattr(model.extra_heads["ori"].bnneck, stat), _their_bn(fx, f"bottleneck.{stat}"))
    assert int(moe.expert_norm.num_batches_tracked) == int(_their_bn(fx, f"{gate}.num_batches_tracked")) == 4


def test_missing_modalities_fed_as_zero_images_equal_theirs(loaded):
    """Their TEST.MISS cases: the removed modalities' images are zeros after normalisation."""
    tower, fx, model, _ = loaded
    x = their_inputs(fx)
    for case in ("r", "n", "t", "rn", "rt", "nt"):
        removed = [m for m in MODS if m[0] in case]
        with torch.no_grad():
            out = model({m: torch.zeros_like(v) if m in removed else v for m, v in x.items()}, fx["input.cam_label"])
        assert close(out.test_feat, fx[f"missing.{case}.pattern3"]), case


def fixture_order(paths):
    """The fixture row of each feature row, from the saved ``modality=path;...`` strings."""
    return [int(re.search(r"rgb=[^;]*_(\d\d)\.png", str(p))[1]) for p in paths]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_missing_protocol_with_zero_fill_gives_their_missing_features(tmp_path):
    """``eval.protocol: missing`` with ``eval.missing_fill: zeros`` ranks exactly their TEST.MISS features,
    case by case, through the evaluator (query and gallery alike); with ``drop`` a fusion that needs every
    modality is refused when the evaluator is built, naming the fix."""
    from accelerate import Accelerator

    from hybrid_reid.data import load_data
    from hybrid_reid.engine.train import _evaluator, resolve_config

    fx = fixture("clip")
    root = write_their_rgbnt201(fx, tmp_path / "data", extra_train_camera=6)
    common = [*TINY["clip"], f"data.root={root}", "data.num_workers=0", "data.test_batch_size=4", "model.num_cams=6",
              "eval.protocol=missing"]
    cfg = load_config(METHOD, [*common, "eval.missing_fill=zeros"])
    data = load_data(cfg.data)
    cfg = resolve_config(cfg, data)
    model = build_model(cfg.model, modalities=data.modalities)
    load_model_weights(model, their_checkpoint(fx, tmp_path / "theirs.pth"), inference=True)
    ev = _evaluator(Accelerator(cpu=True), cfg, data, model)
    ranked = []
    rank = ev.rank
    ev.rank = lambda q, g: ranked.append((q, g)) or rank(q, g)
    result = ev.run(model)
    assert list(result["missing"]) == ["r", "n", "t", "rn", "rt", "nt", "average"]
    assert len(ranked) == 7  # the full input, then the six cases
    for (q, g), case in zip(ranked, [None, "r", "n", "t", "rn", "rt", "nt"]):
        want = fx["eval.pattern3" if case is None else f"missing.{case}.pattern3"][fixture_order(q["paths"])]
        assert q["modalities"] == MODS and (q["feat"] - want).abs().max() < 1e-4, case
        assert g["feat"] is q["feat"] or torch.equal(g["feat"], q["feat"])  # query = gallery in RGBNT201
    cfg = resolve_config(load_config(METHOD, [*common, "eval.missing_fill=drop"]), data)
    with pytest.raises(ValueError, match="needs every modality.*or set eval.missing_fill=zeros"):
        _evaluator(Accelerator(cpu=True), cfg, data, model)
    cfg = resolve_config(load_config(METHOD, [*common[:-1], "eval.query_modalities=[nir]"]), data)
    with pytest.raises(ValueError, match="needs every modality"):
        _evaluator(Accelerator(cpu=True), cfg, data, model)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_convert_weights_and_eval_their_checkpoint_end_to_end(tmp_path):
    """``convert-weights --from demo`` and ``eval --checkpoint THEIRS.pth`` (a DDP ``module.`` save) on their
    images: the saved features are their pattern-3 test features."""
    fx = fixture("clip")
    theirs = their_checkpoint(fx, tmp_path / "DeMo_best.pth", prefix="module.")
    ours = tmp_path / "demo.safetensors"
    r = run_python("run.py", "convert-weights", "--from", "demo", theirs, str(ours))
    assert r.returncode == 0, r.stderr[-3000:]
    n_theirs = sum(k.startswith("state_dict.") for k in fx)
    # their 4 x 7 expert Linear + BatchNorm tensors (4 x 7 x 7) become 7 here; everything else one to one
    assert f"{n_theirs - 4 * 7 * 7 + 7} tensors in this project's layout" in r.stdout, r.stdout
    assert "0 of its keys have no place here" in r.stdout
    converted = load_file(str(ours))
    assert converted["modality_fusion.moe.expert_weight"].shape == (7, HEADS, 16, 16)
    assert "modality_fusion.hdm.branches.rnt.in_proj_weight" in converted
    assert "extra_heads.ori.classifier.weight" in converted and "head.classifier.weight" in converted
    root = write_their_rgbnt201(fx, tmp_path / "data", extra_train_camera=6)
    common = [*TINY["clip"], f"data.root={root}", "data.num_workers=0", "data.test_batch_size=4", "model.num_cams=6"]
    for i, ckpt in enumerate((theirs, str(ours))):
        feats = tmp_path / f"{os.path.basename(ckpt)}.npz"
        args = ["eval", "--config", METHOD, "--checkpoint", ckpt, *common, f"output_dir={tmp_path / 'ev'}",
                "--save-features", str(feats)]
        if i == 0:  # their file through run.py itself
            r = run_python("run.py", *args)
            assert r.returncode == 0, r.stderr[-3000:]
            assert "ID classifier(s)" in r.stderr  # 3 training identities here, 5 in their file: not a blocker
        else:  # the converted file through the same command, in this process
            from hybrid_reid.cli import main

            assert main(args) == 0
        with np.load(feats) as z:
            got, paths = z["query.feat"], z["query.paths"]
        assert np.abs(got - fx["eval.pattern3"].numpy()[fixture_order(paths)]).max() < 1e-4, ckpt
    metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert metrics["mAP"] > 0


def test_detect_claims_only_demo_checkpoints():
    from hybrid_reid.methods import LAYOUTS, detect_layout

    demo = their_state_dict(fixture("clip"))
    assert detect_layout(demo).name == "demo" and detect_layout(their_state_dict(fixture("vit"))).name == "demo"
    mambapro = load_file(os.path.join(ROOT, "tests", "fixtures", "mambapro", "mambapro_clip.safetensors"))
    assert detect_layout(their_state_dict(mambapro)).name == "mambapro"
    t = torch.zeros(1)
    others = {  # the key families of the other ported methods' checkpoints
        "topreid": ["RGB.base.cls_token", "CRM.x", "TPM.x", "bottleneck_TPM.weight", "classifier_TPM.weight"],
        "idea": ["BACKBONE.base.class_embedding", "BACKBONE.cv_embed", "BACKBONE.inverseNet.x", "CDA.x",
                 "bottleneck_v.weight", "classifier_v.weight", "visual_classifier.weight"],
        "mdreid": ["BACKBONE.base.class_embedding", "BACKBONE.cv_embed", "bottleneck_r.weight", "classifier_r.weight",
                   "bottleneck_rs.weight", "classifier_s.weight"],
    }
    for name, keys in others.items():
        assert not LAYOUTS.get("demo").detect({k: t for k in keys}), name


def test_direct_0_heads_and_losses():
    """Their vehicle recipe (DIRECT 0): each modality's PIFE feature with its own BNNeck and classifier
    (``bottleneck_{r,n,t}`` / ``classifier_{r,n,t}`` in their files), the losses summed as their loop does."""
    fx = fixture("clip")
    sd = {k: v for k, v in their_state_dict(fx).items() if not k.startswith(("bottleneck.", "classifier."))}
    g = torch.Generator().manual_seed(0)
    for t in "rnt":  # a DIRECT 0 file: per-modality heads with values of their own
        sd[f"classifier_{t}.weight"] = torch.randn(5, F_DIM, generator=g) * 0.1
        their_bn = {"weight": 1 + 0.1 * torch.randn(F_DIM, generator=g), "bias": torch.zeros(F_DIM),
              "running_mean": torch.zeros(F_DIM), "running_var": torch.ones(F_DIM),
              "num_batches_tracked": torch.tensor(0)}
        sd |= {f"bottleneck_{t}.{k}": v for k, v in their_bn.items()}
    from hybrid_reid.methods import LAYOUTS

    converted = LAYOUTS.get("demo").convert(sd).state
    model, cfg = model_for("clip", "model.modality_fusion_kwargs.direct=false")
    assert set(model.extra_heads) == {"rgb", "nir", "tir"}
    model.load_state_dict(converted, strict=True)
    out = model.train()(their_inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    assert set(losses) == {"id", "triplet", "moe_aux", "total"} | {f"{k}.{m}" for k in ("id", "triplet") for m in MODS}
    y = fx["input.label"]
    for m, t in THEIRS.items():  # their loss_fn on (score, feat), written out
        g_m = fx[f"inter.pife.{t}.global_reduced"]
        assert close(out.extra[m].feat, g_m)
        bn = F.batch_norm(g_m, None, None, sd[f"bottleneck_{t[0].lower()}.weight"], torch.zeros(F_DIM), training=True)
        score = bn @ sd[f"classifier_{t[0].lower()}.weight"].t()
        logp = score.log_softmax(1)
        target = torch.full_like(logp, 0.1 / 5).scatter(1, y[:, None], 0.9 + 0.1 / 5)
        ce = -(target * logp).sum(1).mean()
        dist = torch.cdist(g_m, g_m)
        same = y[:, None] == y[None]
        tri = F.softplus(dist.masked_fill(~same, -1).amax(1) - dist.masked_fill(same, 1e9).amin(1)).mean()
        assert abs(float(losses[f"id.{m}"]) - 0.25 * float(ce)) < 1e-5, m
        assert abs(float(losses[f"triplet.{m}"]) - float(tri)) < 1e-5, m
    assert abs(float(losses["id"]) - 0.25 * float(fx["loss.moe.id"])) < 1e-5
    assert abs(float(losses["triplet"]) - float(fx["loss.moe.tri"])) < 1e-5


def test_ablation_switches_against_their_intermediates():
    """``atmoe: false`` (their ATM off): moe is the decoupled features concatenated; ``pife: false``
    (their GLOBAL_LOCAL off): ori is the class tokens concatenated."""
    fx = fixture("clip")
    sd = their_state_dict(fx)
    from hybrid_reid.methods import LAYOUTS

    converted = LAYOUTS.get("demo").convert(sd).state
    model, _ = model_for("clip", "model.modality_fusion_kwargs.atmoe=false")
    model.load_state_dict({k: v for k, v in converted.items() if ".moe." not in k}, strict=True)
    with torch.no_grad():
        out = model.eval()(their_inputs(fx), fx["input.cam_label"])
    assert close(out.feat, torch.cat([fx[f"inter.hdm.{n}"] for n in SUBSETS], 1))
    model, _ = model_for("clip", "model.modality_fusion_kwargs.pife=false")
    model.load_state_dict({k: v for k, v in converted.items() if ".pife." not in k}, strict=True)
    with torch.no_grad():
        out = model.eval()(their_inputs(fx), fx["input.cam_label"])
    assert close(out.extra["ori"].feat, torch.cat([fx[f"inter.backbone.{t}.cls"] for t in THEIRS.values()], 1))


def test_hdm_query_attention_equals_torch_multihead_attention():
    """Our one-query attention (no key / value projection of the tokens) against nn.MultiheadAttention,
    with several heads (the fixture's HDM has one) and token sets of different lengths."""
    torch.manual_seed(0)
    dim, heads = 128, 2
    ours = DecouplingQuery(dim, heads, dropout=0.0).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    mha.load_state_dict({"in_proj_weight": ours.in_proj_weight, "in_proj_bias": ours.in_proj_bias,
                         "out_proj.weight": ours.out_proj.weight, "out_proj.bias": ours.out_proj.bias})
    sets = [torch.randn(3, 1, dim), torch.randn(3, 20, dim), torch.randn(3, 7, dim)]
    with torch.no_grad():
        got, attn = ours(sets, need_weights=True)
        want, want_attn = mha(ours.token.expand(3, 1, dim), torch.cat(sets, 1), torch.cat(sets, 1),
                              average_attn_weights=False)
    assert torch.allclose(got, want[:, 0], atol=1e-5) and torch.allclose(attn, want_attn[:, :, 0], atol=1e-6)
    ours.dropout = 0.5
    ours.train()
    torch.manual_seed(1)
    dropped = ours(sets)
    assert not torch.allclose(dropped, got, atol=1e-3)  # the attention weights are dropped in training only
    with torch.no_grad():
        assert torch.allclose(ours.eval()(sets), got)


def test_gradients_reach_every_expert_and_every_part():
    """One step on a mixed batch: every expert (each feature x head slice of the batched weight), every
    HDM branch, PIFE, the gate, the heads and the tower receive gradient."""
    torch.manual_seed(0)
    model, cfg = model_for("clip", num_classes=4)
    model.modality_fusion.hdm.branches["r"].dropout = 0.1  # the recipe's dropout on, for one branch
    x = {m: torch.randn(4, 3, 256, 128) for m in MODS}
    out = model.train()(x, torch.tensor([0, 1, 2, 3]))
    build_criterion(cfg.loss)(out, torch.tensor([0, 0, 1, 1]))["total"].backward()
    moe = model.modality_fusion.moe
    grad = moe.expert_weight.grad.abs().sum((2, 3))  # [7, heads]
    assert grad.shape == (7, HEADS) and bool((grad > 0).all()), grad
    assert bool((moe.expert_bias.grad.abs().sum(2) > 0).all())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hybrid_towers_train_one_step():
    """Both towers (grids 16x8 and 21x10): PIFE reads the tower-fused feature, every tower's patches join
    the HDM keys."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", "methods", "demo_hybrid.yaml"), [
        "model.towers.clip.pretrained=null", "model.towers.clip.tower_kwargs={width: 64, layers: 1, heads: 2, "
        "out_dim: 64}", "model.towers.vit.pretrained=null", "model.towers.vit.tower_kwargs={width: 64, layers: 1, "
        "heads: 2}", "model.feat_dim=64", "model.num_classes=4", "model.num_cams=6"])
    model = build_model(cfg.model, modalities=MODS)
    x = {m: torch.randn(4, 3, 256, 128) for m in MODS}
    out = model.train()(x, torch.tensor([0, 1, 2, 3]))
    assert out.feat.shape == (4, 7 * 64) and out.test_feat.shape == (4, 10 * 64)
    build_criterion(cfg.loss)(out, torch.tensor([0, 0, 1, 1]))["total"].backward()
    assert all(p.grad is not None for p in model.encoder.backbones["vit"].tower.parameters() if p.requires_grad)
    with torch.no_grad():
        branch = model.modality_fusion.hdm.branches["rnt"]
        enc = model.eval()(x, torch.tensor([0, 1, 2, 3])).encoder
        sets = [t for m in MODS for t in (enc[m].feat[:, None], enc[m].projected["clip"].patches,
                                          enc[m].projected["vit"].patches)]
        assert branch(sets, need_weights=True)[1].shape == (4, 1, 3 * (1 + 128 + 210))


def info_lines(capsys, *argv):
    """``run.py info`` (in this process): ``{first word: the other words}`` per component line."""
    from hybrid_reid.cli import main

    assert main(["info", *argv]) == 0
    out = capsys.readouterr().out
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line and line[0] != " "}


def test_info_counts_equal_the_papers(capsys):
    """With their RGBNT201 build's 171 identities and 4 cameras, the trainable count is the paper's 98.79 M
    (ablation row D/E), part by part equal to their code's."""
    lines = info_lines(capsys, "--config", METHOD, "model.num_classes=171", "model.num_cams=4")
    assert lines["modality_fusion.pife"][0] == "1,580,544" and lines["modality_fusion.hdm"][0] == "7,357,952"
    assert lines["modality_fusion.atmoe"][0] == "2,830,336"
    assert lines["total"][1] == "98,792,960"  # their code: 98,792,960 trainable (98,798,080 with frozen BN biases)
    assert lines["total"][0] == "98,798,080"
    lines = info_lines(capsys, "--config", CONFIG["vit"], "model.num_classes=171", "model.num_cams=4")
    assert lines["total"][:2] == ["113,529,600", "113,521,920"]  # their ViT build, exactly


@pytest.mark.parametrize("tower", ["clip", "vit"])
def test_their_file_as_a_towers_pretrained_weights(tower, tmp_path):
    """Their checkpoint as ``model.towers.<t>.pretrained``: the tower and its camera table load from it (the
    rest is left unused), the same tensors as the whole-model conversion."""
    from hybrid_reid.methods import LAYOUTS

    fx = fixture(tower)
    path = their_checkpoint(fx, tmp_path / "theirs.pth")
    model, _ = model_for(tower, f"model.towers.{tower}.pretrained={path}")
    converted = LAYOUTS.get("demo").convert(their_state_dict(fx)).state
    own = model.state_dict()
    keys = [k for k in converted if k.startswith(f"encoder.backbones.{tower}.")]
    assert any(k.endswith("sie.table") for k in keys) and len(keys) > 20
    for k in keys:
        assert torch.equal(own[k], converted[k]), k
