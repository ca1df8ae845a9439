"""MambaPro (prompts, adapters, Mamba aggregation) held against the authors' code run on tiny random
weights (tests/fixtures/mambapro/README.md), and its checkpoints brought into this project."""
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python
from peers import THEIRS, close, their_checkpoint, their_inputs, write_their_rgbnt201
from safetensors.torch import load_file, save_file

from hybrid_reid import build_model, load_config
from hybrid_reid.losses import build_criterion
from hybrid_reid.models.checkpoint import load_model_weights

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mambapro")
METHOD = os.path.join(ROOT, "configs", "methods", "mambapro.yaml")
MODS = ["rgb", "nir", "tir"]
# the fixture's tiny towers (their sizes, no pretrained file), otherwise the method's configs unchanged
TINY = {
    "clip": ["model.towers.clip.pretrained=null", "model.towers.clip.tower_kwargs={width: 64, layers: 2, heads: 2, "
             "out_dim: 32}", "model.feat_dim=32"],
    "vit": ["model.towers.vit.pretrained=null", "model.towers.vit.tower_kwargs={width: 40, layers: 2, heads: 2}",
            "model.feat_dim=40", "model.towers.vit.drop_path=0.0"],  # the fixture ran without stochastic depth
}
CONFIG = {"clip": METHOD, "vit": os.path.join(ROOT, "configs", "methods", "mambapro_vit.yaml")}


def fixture(tower):
    return load_file(os.path.join(FIXTURES, f"mambapro_{tower}.safetensors"))


def model_for(tower, *extra, num_classes=5):
    cfg = load_config(CONFIG[tower], [*TINY[tower], f"model.num_classes={num_classes}", "model.num_cams=6", *extra])
    return build_model(cfg.model, modalities=MODS), cfg


@pytest.fixture(scope="module", params=["clip", "vit"])
def loaded(request, tmp_path_factory):
    tower = request.param
    fx = fixture(tower)
    model, cfg = model_for(tower)
    load_model_weights(model, their_checkpoint(fx, tmp_path_factory.mktemp("mp") / "theirs.pth"))
    return tower, fx, model, cfg


def test_prompted_tower_equals_theirs(loaded):
    """The tower with prompts (CLIP) and parallel adapters: every token of every modality."""
    tower, fx, model, _ = loaded
    model.eval()
    x = their_inputs(fx)
    with torch.no_grad():
        for m in MODS:
            enc = model.encoder(x[m], fx["input.cam_label"], modality=m)
            p = enc.projected[tower]
            ours = torch.cat([p.cls[:, None], p.patches], dim=1)
            assert close(ours, fx[f"inter.backbone.{THEIRS[m]}"]), m


def test_mamba_aggregation_equals_theirs(loaded):
    """Each part from its own stored input (their tower tokens; their intra output): the first block's
    intra and inter scans, and the whole aggregation (chaining the parts instead compounds float32
    rounding over the 384-step joint scan to 1.6e-5)."""
    tower, fx, model, _ = loaded
    model.eval()
    agg = model.modality_fusion.aggregators[tower]
    tokens = {m: fx[f"inter.backbone.{THEIRS[m]}"] for m in MODS}
    cls, patches = {m: t[:, 0] for m, t in tokens.items()}, {m: t[:, 1:] for m, t in tokens.items()}
    tag = {"rgb": "r", "nir": "n", "tir": "t"}
    with torch.no_grad():
        intra = agg.blocks[0]["intra"](patches)
        inter = agg.blocks[0]["inter"]({m: fx[f"inter.aam.layer0.intra.{tag[m]}"] for m in MODS})
        for m in MODS:
            assert close(intra[m], fx[f"inter.aam.layer0.intra.{tag[m]}"]), m
            assert close(inter[m], fx[f"inter.aam.layer0.out.{tag[m]}"]), m
        assert close(agg(cls, patches), fx["eval.feat"])


def test_whole_model_eval_feature_equals_theirs(loaded):
    tower, fx, model, _ = loaded
    model.eval()
    with torch.no_grad():
        out = model(their_inputs(fx), fx["input.cam_label"])
    assert close(out.feat, fx["eval.feat"])  # MAMBA on: the fused feature, no BNNeck
    assert close(out.extra["ori"].feat, fx["eval.feat_nomamba"])  # MAMBA off: the concatenation


def test_one_training_step_equals_theirs(loaded):
    """DIRECT 1: outputs, every loss (0.25 x label-smoothed CE + soft-margin triplet, on fuse and ori)
    and the BatchNorm statistics after the step."""
    tower, fx, model, cfg = loaded
    import copy

    model = copy.deepcopy(model).train()
    out = model(their_inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    assert close(out.feat, fx["train.fuse_feat"])
    assert close(out.logits, fx["train.fuse_score"])
    assert close(out.extra["ori"].logits, fx["train.ori_score"])
    expected = {"id": 0.25 * fx["loss.fuse.id"], "triplet": fx["loss.fuse.tri"], "id.ori": 0.25 * fx["loss.ori.id"],
                "triplet.ori": fx["loss.ori.tri"], "total": fx["loss.total"]}
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert abs(float(losses[k]) - float(v)) < 1e-5, k
    assert close(model.head.bnneck.running_mean, fx["train.bn_after.bottleneck_fuse.running_mean"])
    assert close(model.extra_heads["ori"].bnneck.running_var, fx["train.bn_after.bottleneck.running_var"])
    agg = model.modality_fusion.aggregators[tower]
    got = agg.blocks[1]["inter"].conv["tir"][1].running_mean
    assert close(got, fx["train.bn_after.AAM.ma_block.1.SSM_inter.conv2d_t.1.running_mean"])


@pytest.mark.parametrize("tower", ["clip", "vit"])
def test_direct_0_recipe_equals_theirs(tower, tmp_path):
    """RGBNT100 / MSVR310's DIRECT 0: every modality's feature through one shared head, plus fuse."""
    fx = fixture(tower)
    model, cfg = model_for(tower, "model.modality_fusion_kwargs={direct: false}")
    load_model_weights(model, their_checkpoint(fx, tmp_path / "theirs.pth"))
    out = model.train()(their_inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    for m in MODS:
        assert close(out.extra[f"modality:{m}"].logits, fx[f"train.direct0.{THEIRS[m]}_score"]), m
    assert abs(float(losses["total"]) - float(fx["loss.direct0.total"])) < 1e-5
    for m in MODS:
        mine = float(losses[f"id.modality:{m}"] + losses[f"triplet.modality:{m}"])
        assert abs(mine - float(fx[f"loss.direct0.{THEIRS[m]}"])) < 1e-5, m


def test_every_modalitys_prompts_and_adapters_train_in_one_mixed_step():
    torch.manual_seed(0)
    model, cfg = model_for("clip")
    with torch.no_grad():  # the prompts start at zero: make every path carry gradient
        for p in model.encoder.backbones["clip"].parts.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = {m: torch.randn(4, 3, 256, 128) for m in MODS}
    out = model.train()(x, torch.tensor([0, 1, 2, 3]))
    build_criterion(cfg.loss)(out, torch.tensor([0, 0, 1, 1]))["total"].backward()
    parts = model.encoder.backbones["clip"].parts
    for i in range(2):
        for m in MODS:
            assert parts.prompts[i][m].grad is not None and parts.prompts[i][m].grad.abs().sum() > 0, (i, m)
            assert all(p.grad.abs().sum() > 0 for p in parts.cross[i][m].parameters()), (i, m)
        assert all(p.grad.abs().sum() > 0 for p in parts.adapters[i].parameters()), i
    # block 0 has no previous prompt to transfer, as in their code; block 1's transfer trains
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in parts.transfer[0].parameters())
    assert all(p.grad.abs().sum() > 0 for p in parts.transfer[1].parameters())
    assert all(p.grad is None for p in model.encoder.backbones["clip"].tower.parameters())  # frozen
    assert all(p.grad.abs().sum() > 0 for p in model.modality_fusion.parameters() if p.requires_grad)


def test_convert_weights_and_eval_their_checkpoint_end_to_end(tmp_path):
    """``convert-weights --from mambapro`` and ``eval --checkpoint THEIRS.pth`` on their images: the saved
    features are their test features."""
    fx = fixture("clip")
    theirs = their_checkpoint(fx, tmp_path / "MambaPro_best.pth")
    ours = tmp_path / "mambapro.safetensors"
    r = run_python("run.py", "convert-weights", "--from", "mambapro", theirs, str(ours))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "265 tensors in this project's layout" in r.stdout and "0 of its keys have no place here" in r.stdout
    converted = load_file(str(ours))
    assert "extra_heads.modality.classifier.weight" in converted  # their DIRECT 0 head, kept for that recipe
    assert "modality_fusion.aggregators.clip.blocks.0.inter.scan.joint.A_log" in converted
    assert "encoder.backbones.clip.parts.prompts.1.tir" in converted
    assert "extra_heads.ori.classifier.weight" in converted
    # their four test images as an RGBNT201 test split (lossless PNG; camera and identity in the names)
    root = tmp_path / "data"
    write_their_rgbnt201(fx, root)
    common = [*TINY["clip"], f"data.root={root}", "data.num_workers=0", "data.test_batch_size=4", "model.num_cams=6"]
    for ckpt in (theirs, str(ours)):
        feats = tmp_path / f"{os.path.basename(ckpt)}.npz"
        r = run_python("run.py", "eval", "--config", METHOD, "--checkpoint", ckpt, *common,
                       f"output_dir={tmp_path / 'ev'}", "--save-features", str(feats))
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(feats) as z:
            got, paths = z["query.feat"], z["query.paths"]
        order = [int(str(p).split("rgb=")[1].split(";")[0][-6:-4]) for p in paths]
        assert np.abs(got - fx["eval.feat"].numpy()[order]).max() < 1e-4, ckpt
    assert "ID classifier(s)" in r.stderr  # 2 training identities here, 5 in their file: not a blocker


def test_a_missing_modality_protocol_is_refused_at_config_time(tmp_path):
    r = run_python("run.py", "train", "--config", METHOD, *TINY["clip"], "data.name=synthetic",
                   f"data.root={tmp_path / 'd'}", "data.synth.ids=12", "data.synth.cams=2", "data.synth.size=[64,32]",
                   "model.img_size=[64,32]", "eval.protocol=missing", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "model.modality_fusion=mamba needs every modality" in r.stderr
    assert not (tmp_path / "o").exists()


def test_info_lists_prompts_adapters_and_the_aggregation():
    r = run_python("run.py", "info", "--config", METHOD)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line and line[0] != " "}
    assert lines["clip.prompts"][0] == "28,477,440" and lines["clip.adapters"][0] == "28,339,200"
    assert lines["modality_fusion"][0] == "17,358,336" and lines["clip.tower"][1] == "0"  # frozen
    assert lines["total"][1] == "74,182,656"  # trainable; the authors' count is 74.20 M (README, Methods)


def test_the_plain_scan_equals_mamba_ssm_reference_recurrence():
    """Our scan against the recurrence written out naively (mamba-ssm's selective_scan_ref, per step)."""
    from hybrid_reid.models.mamba import selective_scan_reference

    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 6, 4, 9
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.1
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    got = selective_scan_reference(u, delta, A, B, C, D, bias, True)
    dt = torch.nn.functional.softplus(delta + bias[:, None])
    h = torch.zeros(b, d, n)
    ys = []
    for i in range(length):
        h = torch.exp(dt[:, :, i, None] * A) * h + dt[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]
        ys.append((h * C[:, None, :, i]).sum(-1))
    assert torch.allclose(got, torch.stack(ys, 2) + u * D[:, None], atol=1e-6)


def test_converted_state_dict_loads_strictly_for_training(tmp_path):
    """A converted file into the full training model (its classifiers included) needs no leniency."""
    fx = fixture("clip")
    from hybrid_reid.methods import LAYOUTS

    sd = {k[len("state_dict."):]: v.float() for k, v in fx.items() if k.startswith("state_dict.") and
          v.is_floating_point()}
    sd |= {k[len("state_dict."):]: v for k, v in fx.items() if k.startswith("state_dict.") and not
           v.is_floating_point()}
    converted = LAYOUTS.get("mambapro").convert(sd)
    model, _ = model_for("clip")
    own = model.state_dict()
    assert set(own) <= set(converted.state)
    assert {k for k in converted.state if k not in own} == {k for k in converted.state if "extra_heads.modality" in k}
    save_file({k: v.contiguous() for k, v in converted.state.items() if k in own}, str(tmp_path / "m.safetensors"))
    load_model_weights(model, tmp_path / "m.safetensors")
