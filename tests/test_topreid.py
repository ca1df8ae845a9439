"""TOP-ReID (a tower per modality, token permutation, complementary reconstruction) held against the
authors' code run on tiny random weights (tests/fixtures/topreid/README.md), its checkpoints brought
into this project, and per-modality towers (``model.share_towers: false``) on any tower."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_python
from peers import THEIRS, close, their_checkpoint, their_inputs, their_state_dict, write_their_rgbnt201
from safetensors.torch import load_file

from hybrid_reid import build_model, load_config
from hybrid_reid.losses import build_criterion
from hybrid_reid.methods import LAYOUTS, detect_layout
from hybrid_reid.models import ModalityTowers, parameter_summary
from hybrid_reid.models.checkpoint import load_model_weights

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "topreid", "topreid_vit.safetensors")
METHOD = os.path.join(ROOT, "configs", "methods", "topreid.yaml")
MODS = ["rgb", "nir", "tir"]
SHORT = {"r": "rgb", "n": "nir", "t": "tir"}
# the fixture's tiny towers (their sizes, no pretrained file, no stochastic depth), TPM / CRM with 2 heads
TINY = ["model.towers.vit.pretrained=null", "model.towers.vit.tower_kwargs={width: 32, layers: 2, heads: 2}",
        "model.feat_dim=32", "model.towers.vit.drop_path=0.0", "model.modality_fusion_kwargs.heads=2"]


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURE)


def model_for(*extra, num_classes=5):
    cfg = load_config(METHOD, [*TINY, f"model.num_classes={num_classes}", "model.num_cams=6", *extra])
    return build_model(cfg.model, modalities=MODS), cfg


@pytest.fixture(scope="module")
def loaded(fx, tmp_path_factory):
    model, cfg = model_for()
    assert load_model_weights(model, their_checkpoint(fx, tmp_path_factory.mktemp("tr") / "theirs.pth")) == "topreid"
    return model.eval(), cfg


def tokens_of(fx):
    return {m: fx[f"inter.{t}.tokens"] for m, t in THEIRS.items()}


def test_each_modalitys_own_tower_equals_theirs(fx, loaded):
    """Every modality through its own ViT copy (own weights, own camera table): all 129 tokens."""
    model, _ = loaded
    towers = model.encoder.backbones["vit"]
    assert isinstance(towers, ModalityTowers) and list(towers) == MODS
    x = their_inputs(fx)
    with torch.no_grad():
        for m, t in THEIRS.items():
            enc = model.encoder(x[m], fx["input.cam_label"], modality=m)
            ours = torch.cat([enc.towers["vit"].cls[:, None], enc.towers["vit"].patches], dim=1)
            assert close(ours, fx[f"inter.{t}.tokens"]), m
            assert close(enc.feat, fx[f"inter.{t}.tokens"][:, 0]), m  # identity projector: the class token
    assert not torch.equal(towers["rgb"].sie.table, towers["nir"].sie.table)


def test_token_permutation_equals_theirs(fx, loaded):
    """From their tower tokens: the class tokens after the first and second stage, and TPM's output."""
    model, _ = loaded
    tpm = model.modality_fusion.tpm["vit"]
    tok = tokens_of(fx)
    cls, patches = {m: t[:, 0] for m, t in tok.items()}, {m: t[:, 1:] for m, t in tok.items()}
    with torch.no_grad():
        start = tpm.stage(0, cls, patches)
        middle = tpm.stage(1, start, patches)
        for m, t in THEIRS.items():
            assert close(start[m], fx[f"inter.TPM.start.{t}_cls"]), m
            assert close(middle[m], fx[f"inter.TPM.middle.{t}_cls"]), m
        assert close(tpm(cls, patches), fx["eval.feat"])


def test_complementary_reconstruction_and_its_loss_equal_theirs(fx, loaded):
    model, _ = loaded
    crm = model.modality_fusion.crm["vit"]
    tok = tokens_of(fx)
    with torch.no_grad():
        for a, ta in THEIRS.items():
            for b, tb in THEIRS.items():
                if a != b:
                    assert close(crm.rebuild[a][b](tok[a]), fx[f"inter.CRM.{ta}_to_{tb}"]), (a, b)
        assert abs(float(crm.loss(tok)) - float(fx["loss.re"])) < 1e-5


def test_whole_model_eval_feature_equals_theirs(fx, loaded):
    model, _ = loaded
    with torch.no_grad():
        out = model(their_inputs(fx), fx["input.cam_label"])
    assert close(out.feat, fx["eval.feat"])  # NECK_FEAT before: TPM's feature (eval.feat: pre)
    assert close(out.bn_feat, fx["eval.feat_after"])  # NECK_FEAT after: through bottleneck_TPM
    assert out.aux_losses == {}  # the reconstruction loss is a training loss


@pytest.mark.parametrize("case", ["r", "n", "t", "rn", "rt", "nt"])
def test_every_missing_case_reconstructs_their_feature(fx, loaded, case):
    """TEST.MISS: the absent modalities' tokens rebuilt by CRM from the present ones, then TPM. The images
    of the absent modalities are simply not given (eval.missing_fill: drop)."""
    model, _ = loaded
    x = {m: v for m, v in their_inputs(fx).items() if m not in {SHORT[c] for c in case}}
    with torch.no_grad():
        out = model(x, fx["input.cam_label"])
    assert close(out.feat, fx[f"missing.{case}.feat"])
    assert close(out.bn_feat, fx[f"missing.{case}.feat_after"])


def test_one_training_step_equals_theirs(fx, loaded):
    """DIRECT 1: outputs, every loss (label-smoothed CE + soft-margin triplet on TPM and ori, the CRM
    loss at weight 1) and the BatchNorm statistics after the step."""
    model, cfg = loaded
    model = copy.deepcopy(model).train()
    out = model(their_inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    assert close(out.feat, fx["train.TPM_feature"]) and close(out.logits, fx["train.TPM_score"])
    assert close(out.extra["ori"].feat, fx["train.ori"]) and close(out.extra["ori"].logits, fx["train.ori_score"])
    expected = {"id": fx["loss.TPM.id"], "triplet": fx["loss.TPM.tri"], "id.ori": fx["loss.ori.id"],
                "triplet.ori": fx["loss.ori.tri"], "crm": fx["loss.re"], "total": fx["loss.total"]}
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert abs(float(losses[k].detach()) - float(v)) < 1e-5, k
    for ours, theirs in ((model.head, "bottleneck_TPM"), (model.extra_heads["ori"], "bottleneck_ViT")):
        assert close(ours.bnneck.running_mean, fx[f"train.after_step.{theirs}.running_mean"])
        assert close(ours.bnneck.running_var, fx[f"train.after_step.{theirs}.running_var"])
    losses["total"].backward()  # the reconstruction targets are not detached: the CRM loss reaches every tower
    for m in MODS:
        assert model.encoder.backbones["vit"][m].tower.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, m


def test_direct_0_recipe_equals_theirs(fx, tmp_path):
    """RGBNT100 / MSVR310's DIRECT 0: each modality's class token through its own tower head, plus TPM."""
    model, cfg = model_for("model.modality_fusion_kwargs.direct=false")
    load_model_weights(model, their_checkpoint(fx, tmp_path / "theirs.pth"))
    with torch.no_grad():
        evaluated = model.eval()(their_inputs(fx), fx["input.cam_label"])
    out = model.train()(their_inputs(fx), fx["input.cam_label"])
    losses = {k: v.detach() for k, v in build_criterion(cfg.loss)(out, fx["input.label"]).items()}
    for m, t in THEIRS.items():
        assert close(evaluated.extra[m].bn_feat, fx[f"inter.{t}.bnneck"]), m  # the tower BNNeck (eval)
        assert close(out.extra[m].feat, fx[f"train.direct0.{t}_global"]), m
        assert close(out.extra[m].logits, fx[f"train.direct0.{t}_score"]), m
        assert abs(float(losses[f"id.{m}"] + losses[f"triplet.{m}"]) - float(fx[f"loss.direct0.{t}"])) < 1e-5, m
    assert abs(float(losses["id"] + losses["triplet"]) - float(fx["loss.direct0.TPM"])) < 1e-5
    assert abs(float(losses["crm"]) - float(fx["loss.direct0.re"])) < 1e-5
    assert abs(float(losses["total"]) - float(fx["loss.direct0.total"])) < 1e-5


def test_per_modality_towers_get_gradient_only_from_their_own_modality():
    """share_towers: false on the quickstart's hybrid (CLIP-style + ViT-style towers, multi-scale, CLIP's
    reused projection): a loss on one modality's feature reaches that modality's copies only."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.share_towers=false", "model.num_classes=4"])
    model = build_model(cfg.model, modalities=MODS)
    enc = model.encoder
    assert enc.reused_proj == {"clip"}
    for ms in enc.multi_scale.values():
        torch.nn.init.normal_(ms.mlp[-1].weight, std=0.02)  # past the zero init: every part must matter
    x = {m: torch.randn(2, 3, 64, 32) for m in MODS}
    out = model.train()(x, torch.tensor([0, 3]))
    nir = out.modality_feats["nir"]
    (nir * torch.randn_like(nir)).sum().backward()
    for t in ("clip", "vit"):
        for m in MODS:
            copy_ = enc.backbones[t][m]
            got = [p.grad is not None and p.grad.abs().sum() > 0 for p in copy_.parameters()]
            assert all(got) if m == "nir" else not any(got), (t, m)
        assert enc.multi_scale[t].mlp[0].weight.grad.abs().sum() > 0  # one per tower, shared by the modalities
    # each modality's feature is its own copy's, with that copy's own CLIP projection
    with torch.no_grad():
        model.eval()
        full = model(x, torch.tensor([0, 3]))
        alone = enc.backbones["clip"]["tir"](x["tir"], torch.tensor([0, 3]))
        assert torch.allclose(full.encoder["tir"].tower_feats["clip"],
                              enc.backbones["clip"]["tir"].proj(alone.cls + enc.multi_scale["clip"](alone.patches,
                                                                                                   alone.grid)))
    assert not torch.equal(enc.backbones["vit"]["rgb"].tower.blocks[0].attn.qkv.weight,
                           enc.backbones["vit"]["tir"].tower.blocks[0].attn.qkv.weight)  # own (random) weights


def test_per_modality_towers_are_one_pretrained_file_loaded_into_each_copy(ckpt_dir):
    """Each copy is built and loaded from the same tower spec and file."""
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2)
    path = str(ckpt_dir / "tiny_vit_tr.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    model, _ = model_for(f"model.towers.vit.pretrained={path}")
    towers = model.encoder.backbones["vit"]
    for m in MODS:
        assert torch.equal(towers[m].tower.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight), m
    towers["rgb"].tower.blocks[1].mlp.fc2.weight.data.add_(1.0)  # and they are copies, not one tensor
    assert not torch.equal(towers["nir"].tower.blocks[1].mlp.fc2.weight, towers["rgb"].tower.blocks[1].mlp.fc2.weight)


def test_parameters_per_part_match_their_build():
    """Their RGBNT201 build (171 identities, 4 cameras; SPEC §11): 324,526,008 parameters, of which three
    never-called 1000-way heads (3 x 769,000) and the three tower heads DIRECT 1 never trains (3 x 132,864)
    have no counterpart here: 321,820,416."""
    cfg = load_config(METHOD, ["model.num_classes=171", "model.num_cams=4"])
    info = parameter_summary(build_model(cfg.model, load_pretrained=False, modalities=MODS))
    comps = {k: v["params"] for k, v in info["components"].items()}
    for m in MODS:
        assert comps[f"vit.{m}.tower"] == 85_746_432 and comps[f"vit.{m}.sie"] == 3_072, m
    assert comps["modality_fusion.tpm"] == 21_261_312 and comps["modality_fusion.crm"] == 42_513_408
    assert comps["head"] == comps["head.ori"] == 398_592
    assert info["total"] == 321_820_416 == 324_526_008 - 3 * 769_000 - 3 * 132_864
    assert info["trainable"] == info["total"] - 2 * 2304  # the BNNeck biases, frozen as theirs


def test_info_lists_every_modalitys_tower_and_the_parts():
    r = run_python("run.py", "info", "--config", os.path.join(ROOT, "configs", "methods", "topreid_rgbnt100.yaml"),
                   *TINY)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line and line[0] != " "}
    assert lines["vit.rgb.tower"] == lines["vit.nir.tower"] == lines["vit.tir.tower"]
    assert lines["vit.tir.sie"][0] == "256" and lines["head.tir"][0] == "64"  # 8 cameras x 32; BNNeck of 32
    assert {"modality_fusion.tpm", "modality_fusion.crm", "head.rgb", "head.nir"} <= set(lines)
    assert "head.ori" not in lines


def test_layout_detection_claims_theirs_only(fx):
    theirs = their_state_dict(fx)
    assert detect_layout(theirs).name == "topreid" and detect_layout(their_state_dict(fx, "module.")).name == "topreid"
    mp = load_file(os.path.join(ROOT, "tests", "fixtures", "mambapro", "mambapro_vit.safetensors"))
    mambapro = {k[len("state_dict."):]: v for k, v in mp.items() if k.startswith("state_dict.")}
    assert detect_layout(mambapro).name == "mambapro"
    t = torch.zeros(1)
    others = {  # the top-level keys of DeMo's, IDEA's and MDReID's saved models
        "demo": ["BACKBONE.base.cls_token", "generalFusion.x", "classifier_moe.weight", "bottleneck_moe.weight"],
        "idea": ["BACKBONE.base.class_embedding", "BACKBONE.inverseNet.x", "CDA.x", "classifier_v.weight"],
        "mdreid": ["BACKBONE.base.pos_embed", "classifier_r.weight", "bottleneck_rs.weight"],
        "transreid": ["base.cls_token", "base.pos_embed", "classifier.weight"]}
    for name, keys in others.items():
        assert not LAYOUTS.get("topreid").detect({k: t for k in keys}), name
    converted = LAYOUTS.get("topreid").convert(theirs)
    assert sorted(converted.unused) == sorted(f"{m}.base.fc.{p}" for m in THEIRS.values() for p in ("weight", "bias"))
    model, _ = model_for("model.modality_fusion_kwargs.direct=false")
    own = set(model.state_dict())
    assert own <= set(converted.state)  # everything a DIRECT 0 model needs, strictly
    assert {k for k in converted.state if k not in own} == {k for k in converted.state if ".ori." in k}


def test_missing_modalities_need_the_reconstruction():
    model, _ = model_for("model.modality_fusion_kwargs.crm=false")
    assert model.modality_fusion.crm is None and not model.modality_fusion.handles_missing
    x = {m: torch.randn(2, 3, 256, 128) for m in ("rgb", "tir")}
    with pytest.raises(ValueError, match="needs every modality"):
        model.eval()(x, torch.tensor([0, 1]))
    out = model.train()({"rgb": x["rgb"], "nir": torch.randn(2, 3, 256, 128), "tir": x["tir"]}, torch.tensor([0, 1]))
    assert "crm" not in out.aux_losses and set(out.extra) == {"ori"}  # RE 0


def test_tpm_takes_any_number_of_modalities():
    """Two modalities: two stages (the other's patches, then its own); one missing is rebuilt from the other."""
    cfg = load_config(METHOD, [*TINY, "model.num_classes=3", "model.num_cams=0", "model.img_size=[64,32]"])
    model = build_model(cfg.model, modalities=["rgb", "nir"])
    assert model.modality_fusion.tpm["vit"].offsets == [1, 0] and model.modality_fusion.out_dim == 64
    out = model.train()({m: torch.randn(4, 3, 64, 32) for m in ("rgb", "nir")})
    assert out.feat.shape == (4, 64) and out.aux_losses["crm"] > 0
    with torch.no_grad():
        alone = model.eval()({"nir": torch.randn(4, 3, 64, 32)})
    assert alone.feat.shape == (4, 64)


def test_convert_weights_and_eval_their_checkpoint_end_to_end(fx, tmp_path):
    """``convert-weights --from topreid`` and ``eval --checkpoint THEIRS.pth`` (saved with DDP's ``module.``
    prefix) on their images: the saved features are their test features; the missing-modality protocol
    runs with the reconstruction."""
    theirs = their_checkpoint(fx, tmp_path / "TOPReID_best.pth", prefix="module.")
    ours = tmp_path / "topreid.safetensors"
    r = run_python("run.py", "convert-weights", "--from", "topreid", theirs, str(ours))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "234 tensors in this project's layout" in r.stdout and "6 of its keys have no place here" in r.stdout
    converted = load_file(str(ours))
    assert "modality_fusion.crm.vit.rebuild.tir.nir.0.attn.qkv.weight" in converted
    assert "encoder.backbones.vit.nir.sie.table" in converted and "extra_heads.tir.classifier.weight" in converted
    # their four test images as an RGBNT201 test split (lossless PNG; camera and identity in the names)
    root = tmp_path / "data"
    write_their_rgbnt201(fx, root)
    common = [*TINY, f"data.root={root}", "data.num_workers=0", "data.test_batch_size=4", "model.num_cams=6"]
    for ckpt in (theirs, str(ours)):
        feats = tmp_path / f"{os.path.basename(ckpt)}.npz"
        r = run_python("run.py", "eval", "--config", METHOD, "--checkpoint", ckpt, *common, "eval.protocol=missing",
                       f"output_dir={tmp_path / 'ev'}", "--save-features", str(feats))
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(feats) as z:
            got, paths = z["query.feat"], z["query.paths"]
        order = [int(str(p).split("rgb=")[1].split(";")[0][-6:-4]) for p in paths]
        assert np.abs(got - fx["eval.feat"].numpy()[order]).max() < 1e-4, ckpt
        metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
        assert set(metrics["missing"]) == {"r", "n", "t", "rn", "rt", "nt", "average"}


def test_bad_input_gets_one_clear_error(fx, tmp_path, capsys):
    """Another method's checkpoint, a TOP-ReID file with a key of a modified model, heads that do not
    divide the width: each refused with a message naming the file / key / setting."""
    from hybrid_reid.cli import main

    mp = load_file(os.path.join(ROOT, "tests", "fixtures", "mambapro", "mambapro_vit.safetensors"))
    torch.save({k[len("state_dict."):]: v for k, v in mp.items() if k.startswith("state_dict.")}, tmp_path / "mp.pth")
    out = str(tmp_path / "o.safetensors")
    assert main(["convert-weights", "--from", "topreid", str(tmp_path / "mp.pth"), out]) == 2
    assert "mp.pth is not a topreid checkpoint" in capsys.readouterr().err
    sd = their_state_dict(fx)
    sd["TPM.Ro_extra.Rotation.norm1.weight"] = torch.ones(32)
    torch.save(sd, tmp_path / "mod.pth")
    assert main(["convert-weights", "--from", "topreid", str(tmp_path / "mod.pth"), out]) == 2
    err = capsys.readouterr().err
    assert "mod.pth looks like a topreid checkpoint, but key 'TPM.Ro_extra.Rotation.norm1.weight' has no place" in err
    assert not (tmp_path / "o.safetensors").exists()
    model, _ = model_for()
    with pytest.raises(Exception, match="TPM.Ro_extra.Rotation.norm1.weight' has no place"):
        load_model_weights(model, str(tmp_path / "mod.pth"))
    with pytest.raises(ValueError, match=r"heads=3 must divide the shared space model.feat_dim=32"):
        model_for("model.modality_fusion_kwargs.heads=3")
