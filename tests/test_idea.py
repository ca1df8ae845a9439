"""IDEA (inverted text, cooperative deformable aggregation) held against the authors' code run on tiny
random weights (tests/fixtures/idea/README.md), its per-modality captions as data, and its checkpoints
brought into this project."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_python
from peers import close
from PIL import Image
from safetensors.torch import load_file

from hybrid_reid import build_model, load_config
from hybrid_reid.config import ConfigError
from hybrid_reid.data import SynthSpec, generate
from hybrid_reid.data.datasets import MSVR310, RGBNT100, RGBNT201, DataError, read_caption_file
from hybrid_reid.data.loader import build_train_loader
from hybrid_reid.data.transforms import PairedTransform
from hybrid_reid.losses import build_criterion
from hybrid_reid.methods import LAYOUTS, detect_layout
from hybrid_reid.modalities import caption_key
from hybrid_reid.models.checkpoint import load_model_weights

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "idea")
METHOD = os.path.join(ROOT, "configs", "methods", "idea.yaml")
MODS = ["rgb", "nir", "tir"]
THEIRS = {"rgb": "RGB", "nir": "NI", "tir": "TI"}  # their modality tags (images, caption files)
EVAL = {"rgb": "RGB", "nir": "NIR", "tir": "TIR"}  # ... and their eval dict's
TEXT = {"rgb": "rgb_text", "nir": "ni_text", "tir": "ti_text"}  # ... and their text dict's
NAMES = ["000001_cam1_0_00.jpg", "000001_cam4_0_01.jpg", "000003_cam2_0_00.jpg", "000003_cam6_0_01.jpg"]
# the fixture's tiny towers (their sizes, no pretrained file; InverseNet dropout 0), the recipe otherwise unchanged
TINY = ["model.towers.clip.pretrained=null", "model.towers.clip.tower_kwargs={width: 64, layers: 2, heads: 2, "
        "out_dim: 32}", "model.feat_dim=32", "model.text.pretrained=null",
        "model.text.tower_kwargs={width: 4, layers: 1, heads: 1, out_dim: 32}", "model.inverted_text.dropout=0.0"]


#: the quickstart's overrides for IDEA (experiments/idea-tiny.yaml): captions, the inverted-text token, the
#: aggregation with one sampling point per patch of the 4x2 tiny grid
QUICK = ["data.modality_captions=true", "model.inverted_text.enabled=true", "model.text.context_length=77",
         "model.modality_fusion=cda", "model.modality_fusion_kwargs={ksize: 1, stride: 1}",
         "model.multi_scale.enabled=false", "loss.id.weight=0.25", "eval.feat=pre"]


@pytest.fixture(scope="module")
def fx():
    return load_file(os.path.join(FIXTURES, "idea_clip.safetensors"))


def images(fx):
    """The network input of the fixture's recipe: uint8 [4,3,32,16] -> normalised (0.5 / 0.5), x8 nearest."""
    return {m: ((fx[f"input.{t}.u8"].float() / 255 - 0.5) / 0.5).repeat_interleave(8, 2).repeat_interleave(8, 3)
            for m, t in THEIRS.items()}


def inputs(fx, zero=()):
    """Images and each modality's caption ids (their tokenised captions), as a batch's ``images``."""
    x = {m: torch.zeros_like(v) if m in zero else v for m, v in images(fx).items()}
    return {**x, **{caption_key(m): fx[f"input.text.{TEXT[m]}"] for m in MODS}}


def their_state(fx):
    return {k[len("state_dict."):]: v.float() if v.is_floating_point() else v for k, v in fx.items()
            if k.startswith("state_dict.")}


def their_checkpoint(fx, path, prefix=""):
    """The authors' state_dict as their loop saves it (``torch.save(model.state_dict())``)."""
    torch.save({prefix + k: v for k, v in their_state(fx).items()}, path)
    return str(path)


def model_for(*extra, num_classes=5, config=METHOD):
    cfg = load_config(config, [*TINY, f"model.num_classes={num_classes}", "model.num_cams=6", *extra])
    return build_model(cfg.model, modalities=MODS), cfg


@pytest.fixture(scope="module")
def loaded(fx, tmp_path_factory):
    model, cfg = model_for()
    assert load_model_weights(model, their_checkpoint(fx, tmp_path_factory.mktemp("idea") / "theirs.pth")) == "idea"
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------- captions
def test_captions_tokenise_to_their_ids(fx, loaded):
    """Their template (prefix, two "X" placeholders, the modality's sentence) and CLIP's BPE: the same
    77 ids, truncation included (NIR caption 2 is 84 tokens long)."""
    model, _ = loaded
    tok = model.tokenizer
    for m in MODS:
        table = read_caption_file(os.path.join(FIXTURES, "text", f"test_{THEIRS[m]}.json"))
        ids = torch.stack([tok.caption(m, table[n]) for n in NAMES])
        assert torch.equal(ids, fx[f"input.text.{TEXT[m]}"]), m
    assert int((fx["input.text.ni_text"][2] > 0).sum()) == 77 and int(fx["input.text.ni_text"][2, -1]) == 49407
    assert model.inverted_text.prompt_start == 5  # their placeholders: positions 5, 6


def test_text_tower_with_prompts_equals_theirs(fx, loaded):
    """The frozen text tower's every position, the global feature (EOT and placeholders averaged) and
    the InverseNet's token."""
    model, _ = loaded
    it = model.inverted_text
    with torch.no_grad():
        for m in MODS:
            ids = fx[f"input.text.{TEXT[m]}"]
            assert close(it.encode(ids), fx[f"inter.{THEIRS[m]}.text_feats"]), m
            assert close(it.global_feature(ids), fx[f"inter.{THEIRS[m]}.text_global"]), m
            assert close(it({m: ids})[m]["clip"], fx[f"inter.{THEIRS[m]}.text_inverse"]), m
    assert not any(p.requires_grad for p in it.text.parameters()) and it.prompts.requires_grad


def test_vision_tower_tokens_equal_theirs(fx, loaded):
    """Every token of the tower with the inverted-text token appended: class, patches, text token
    (after the final norm and CLIP's projection), each modality."""
    model, _ = loaded
    x = inputs(fx)
    with torch.no_grad():
        tokens = model.inverted_text({m: x[caption_key(m)] for m in MODS})
        for m in MODS:
            p = model.encoder(x[m], fx["input.cam_label"], modality=m, text_tokens=tokens[m]).projected["clip"]
            ours = torch.cat([p.cls[:, None], p.patches, p.text[:, None]], dim=1)
            assert close(ours, fx[f"inter.{THEIRS[m]}.image_feats"]), m


def test_cda_equals_theirs(fx, loaded):
    """The aggregation from their tower tokens: offsets, reference points, sampling positions, the
    bilinear samples, the attention weights and the output."""
    model, _ = loaded
    agg = model.modality_fusion.aggregators["clip"]
    maps = [fx[f"inter.{THEIRS[m]}.image_feats"][:, 1:-1].transpose(1, 2).reshape(4, 32, 16, 8) for m in MODS]
    parts = {}
    with torch.no_grad():
        out = agg(maps, fx["inter.cda.boss"], parts)
    assert agg.points == (7, 3)
    assert close(parts["raw"], fx["inter.cda.offset_raw"]) and close(parts["offset"], fx["inter.cda.offset"])
    assert close(agg.reference.expand(4, -1, -1, -1), fx["inter.cda.reference"])
    assert close(parts["pos"], fx["inter.cda.pos"])
    assert close(parts["sampled"], fx["inter.cda.sampled"].squeeze(2))
    assert close(parts["attn"], fx["inter.cda.attn"])
    assert close(out, fx["inter.cda.out"].transpose(1, 2))
    assert close(out[:, 3:].flatten(1), fx["eval.LOCAL_t"]) and close(out[:, :3].flatten(1), fx["eval.LOCAL_v"])


def test_whole_model_eval_features_equal_theirs(fx, loaded):
    """The eval dict: V_*, T_*, LOCAL_v, LOCAL_t; the retrieval feature (LOCAL_t, their model
    selection's) and every other test pattern of their loops (``test_feat``), L2-normalised as they rank."""
    model, cfg = loaded
    with torch.no_grad():
        out = model(inputs(fx), fx["input.cam_label"])
    assert close(out.feat, fx["eval.LOCAL_t"]) and close(out.extra["vv"].feat, fx["eval.LOCAL_v"])
    for m in MODS:
        assert close(out.modality_feats[m], fx[f"eval.V_{EVAL[m]}"]), m
    assert close(out.extra["v"].feat, torch.cat([fx[f"eval.V_{EVAL[m]}"] for m in MODS], 1))
    assert close(out.extra["t"].feat, torch.cat([fx[f"eval.T_{EVAL[m]}"] for m in MODS], 1))
    v, t = "V_RGB+V_NIR+V_TIR", "T_RGB+T_NIR+T_TIR"
    patterns = {"local_t": "LOCAL_t", "local_v": "LOCAL_v", "local": "LOCAL", "v": v, "t": t,
                "globals": f"{v}+{t}", "globals+local": f"{v}+{t}+LOCAL"}
    fusion = model.modality_fusion
    try:
        for ours, theirs in patterns.items():
            fusion.test_feat = ours  # model.modality_fusion_kwargs.test_feat
            with torch.no_grad():
                feat = model(inputs(fx), fx["input.cam_label"]).retrieval_feat("pre")
            assert close(F.normalize(feat, dim=1), fx[f"eval.pattern.{theirs}"]), ours
    finally:
        fusion.test_feat = "local_t"
    assert cfg.model.modality_fusion_kwargs["test_feat"] == "local_t"


def test_one_training_step_equals_theirs(fx, loaded):
    """DIRECT 1: the scores, every loss (0.25 x label-smoothed CE + soft-margin triplet on LOCAL_t, LOCAL_v,
    the V's and the T's) and the BatchNorm statistics after the step."""
    model, cfg = loaded
    model = copy.deepcopy(model).train()
    out = model(inputs(fx), fx["input.cam_label"])
    losses = build_criterion(cfg.loss)(out, fx["input.label"])
    assert close(out.logits, fx["train.score_tt"]) and close(out.extra["vv"].logits, fx["train.score_vv"])
    assert close(out.extra["v"].logits, fx["train.score_v"]) and close(out.extra["t"].logits, fx["train.score_t"])
    expected = {"id": 0.25 * fx["loss.tt.id"], "triplet": fx["loss.tt.tri"], "total": fx["loss.total"]}
    for b in ("v", "t", "vv"):
        expected |= {f"id.{b}": 0.25 * fx[f"loss.{b}.id"], f"triplet.{b}": fx[f"loss.{b}.tri"]}
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert abs(float(losses[k].detach()) - float(v)) < 1e-5, k
    bn = {"head": "bottleneck_textual", "vv": "bottleneck_visual", "v": "bottleneck_v", "t": "bottleneck_t"}
    for ours, theirs in bn.items():
        h = model.head if ours == "head" else model.extra_heads[ours]
        assert close(h.bnneck.running_mean, fx[f"train.bn_after.{theirs}.running_mean"]), ours
        assert close(h.bnneck.running_var, fx[f"train.bn_after.{theirs}.running_var"]), ours
    losses["total"].backward()  # the text tower stays frozen; its prompts and every other part train
    assert model.inverted_text.prompts.grad.abs().sum() > 0
    assert model.encoder.backbones["clip"].text_token.pos.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.inverted_text.text.parameters())


def test_missing_modalities_zero_images_keep_captions(fx, loaded):
    """Their TEST.MISS: the named images are zeros after normalisation, captions and camera kept."""
    model, _ = loaded
    short = {"r": "rgb", "n": "nir", "t": "tir"}
    with torch.no_grad():
        for case in ("r", "n", "t", "rn", "rt", "nt"):
            out = model(inputs(fx, zero=[short[c] for c in case]), fx["input.cam_label"])
            assert close(out.feat, fx[f"missing.{case}.LOCAL_t"]), case
            assert close(out.extra["v"].feat, torch.cat([fx[f"missing.{case}.V_{EVAL[m]}"] for m in MODS], 1)), case


# ----------------------------------------------------------------------------------------- checkpoints
def test_layouts_recognise_only_their_own():
    """IDEA's layout claims their file (plain and ``module.``-prefixed) and nothing of MambaPro or this
    project; MambaPro's does not claim theirs. Other methods' key families (TOP-ReID, DeMo, MDReID) neither."""
    fx = load_file(os.path.join(FIXTURES, "idea_clip.safetensors"))
    sd = their_state(fx)
    assert detect_layout(sd).name == "idea" and detect_layout({"module." + k: v for k, v in sd.items()}).name == "idea"
    mp = load_file(os.path.join(ROOT, "tests", "fixtures", "mambapro", "mambapro_clip.safetensors"))
    assert detect_layout({k[len("state_dict."):]: v for k, v in mp.items() if k.startswith("state_dict.")}).name \
        == "mambapro"
    assert not LAYOUTS.get("mambapro").detect(sd)
    ours = model_for()[0].state_dict()
    assert not LAYOUTS.get("idea").detect(ours) and not LAYOUTS.get("mambapro").detect(ours)
    assert LAYOUTS.get("idea").detect({"module.CDA.da_group.0.proj_q.weight": torch.zeros(1)})  # one key suffices
    # one real key of every module family in their fixtures (/work/peers/<method>/fixture, state_dict.*)
    others = {"topreid": ["RGB.base.cls_token", "NI.base.sie_embed", "TI.base.fc.bias", "RGB.bottleneck.bias",
                          "RGB.classifier.weight", "TPM.Ro_start.Rotation.attn.k_.weight",
                          "CRM.NIRE.re1.blocks.0.attn.proj.bias", "bottleneck_TPM.weight", "classifier_ViT.weight"],
              "demo": ["BACKBONE.base.proj", "BACKBONE.base.conv1.weight", "BACKBONE.cv_embed",
                       "generalFusion.r_token", "generalFusion.rnt.in_proj_bias",
                       "generalFusion.moe.experts.0.expertHead.0.mlp.0.bias", "bottleneck_moe.weight",
                       "classifier_moe.weight", "rgb_reduce.0.bias", "bottleneck.weight", "classifier.weight"],
              "mdreid": ["BACKBONE.base.proj", "BACKBONE.base.add_image_token", "BACKBONE.cv_embed",
                         "bottleneck_t.weight", "bottleneck_ts.weight", "bottleneck_s.weight",
                         "classifier_ts.weight", "classifier_rs.weight"]}
    for name, keys in others.items():
        for prefix in ("", "module."):
            assert not LAYOUTS.get("idea").detect(dict.fromkeys((prefix + k for k in keys), torch.zeros(1))), name


def test_convert_weights_and_eval_their_checkpoint_end_to_end(fx, tmp_path):
    """``convert-weights --from idea`` and ``eval --checkpoint THEIRS.pth`` on their images with their
    captions (an RGBNT201 folder with ``text/``): the saved features are their LOCAL_t. The data root's
    path contains "train" (their reader would then take the training captions for the test split)."""
    theirs = their_checkpoint(fx, tmp_path / "IDEA_best.pth", prefix="module.")
    ours = tmp_path / "idea.safetensors"
    r = run_python("run.py", "convert-weights", "--from", "idea", theirs, str(ours))
    assert r.returncode == 0, r.stderr[-3000:]
    converted = load_file(str(ours))
    assert "inverted_text.prompts" in converted and "encoder.backbones.clip.text_token.pos" in converted
    assert converted["modality_fusion.aggregators.clip.q.weight"].shape == (32, 32)
    assert "extra_heads.vv.classifier.weight" in converted and "inverted_text.inverse.clip.fc2.bias" in converted
    root = tmp_path / "train_root"
    base = root / "RGBNT201"
    for split in ("train_171", "test"):
        for m, tag in THEIRS.items():
            d = base / split / tag
            d.mkdir(parents=True)
            u8 = fx[f"input.{tag}.u8"].repeat_interleave(8, 2).repeat_interleave(8, 3)
            for i, name in enumerate(NAMES):  # lossless PNG content under their .jpg names
                Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(d / name, format="PNG")
    shutil.copytree(os.path.join(FIXTURES, "text"), base / "text")
    for tag in THEIRS.values():  # training captions that would change the features if the test split read them
        with open(base / "text" / f"train_{tag}.json", "w") as f:
            json.dump([{"item": n, "description": "a training caption"} for n in NAMES], f)
    common = [*TINY, f"data.root={root}", "data.num_workers=0", "data.test_batch_size=4", "model.num_cams=6",
              "train.mixed_precision=no"]
    for ckpt in (theirs, str(ours)):
        feats = tmp_path / f"{os.path.basename(ckpt)}.npz"
        r = run_python("run.py", "eval", "--config", METHOD, "--checkpoint", ckpt, *common,
                       f"output_dir={tmp_path / 'ev'}", "--save-features", str(feats))
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(feats) as z:
            got, paths = z["query.feat"], z["query.paths"]
        order = [NAMES.index(os.path.basename(str(p).split("rgb=")[1].split(";")[0])) for p in paths]
        assert np.abs(got - fx["eval.LOCAL_t"].numpy()[order]).max() < 1e-4, ckpt


def test_direct_0_heads_and_their_keys():
    """RGBNT100's DIRECT 0: a head on each modality's V and T (their bottleneck_{v,t}_{rgb,nir,tir}),
    LOCAL_v and LOCAL_t; their key names convert onto exactly these heads, and the step's losses are named."""
    model, cfg = model_for(config=os.path.join(ROOT, "configs", "methods", "idea_rgbnt100.yaml"))
    assert set(model.extra_heads) == {f"{k}_{m}" for k in "vt" for m in MODS} | {"vv"}
    sd = {f"bottleneck_{k}_{m}.weight": torch.ones(32) for k in "vt" for m in MODS}
    sd |= {f"classifier_{k}_{m}.weight": torch.ones(5, 32) for k in "vt" for m in MODS}
    sd["CDA.da_group.0.proj_q.weight"] = torch.ones(96, 96, 1, 1)
    sd |= {k: v for k, v in their_state(load_file(os.path.join(FIXTURES, "idea_clip.safetensors"))).items()
           if k.startswith("BACKBONE.base.visual.")}
    got = LAYOUTS.get("idea").convert(sd).state
    own = model.state_dict()
    for k in (f"extra_heads.{h}_{m}.{p}" for h in "vt" for m in MODS for p in ("bnneck.weight", "classifier.weight")):
        assert k in got and k in own and got[k].shape == own[k].shape, k
    assert got["modality_fusion.aggregators.clip.q.weight"].shape == (96, 96)
    x = {m: torch.randn(4, 3, 128, 256) for m in MODS}
    tok = model.tokenizer
    x |= {caption_key(m): torch.stack([tok.caption(m, "a white car")] * 4) for m in MODS}
    losses = build_criterion(cfg.loss)(model.train()(x, torch.tensor([0, 1, 2, 3])), torch.tensor([0, 0, 1, 1]))
    assert {"id", "triplet", "id.vv", "id.t_nir", "triplet.v_tir"} <= set(losses)
    assert "a X vehicle in the near infrared spectrum: a white car" in tok.caption_text("nir", "a white car")


def test_info_counts_their_parts():
    """Their RGBNT201 build: 91,673,601 trainable (171 classes, 4 cameras; the paper's 91.67 M); here 1 less:
    their unused logit_scale."""
    r = run_python("run.py", "info", "--config", METHOD, "model.num_classes=171", "model.num_cams=4")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line and line[0] != " "}
    assert lines["inverted_text.tower"][:2] == ["63,428,096", "0"]  # frozen
    assert lines["inverted_text.inverse"][0] == "2,624,256" and lines["inverted_text.prompts"][0] == "1,024"
    assert lines["modality_fusion"][0] == "1,847,296" and lines["clip.text_token"][0] == "768"
    tower = sum(int(lines[k][0].replace(",", "")) for k in ("clip.tower", "clip.projector", "clip.text_token"))
    assert tower == 86_141_184  # their visual tower: ours + CLIP's projection + the text token's position
    assert lines["total"][1] == "91,673,600"


# -------------------------------------------------------------------------------------------- data
def _synth(root, layout="rgbnt201"):
    return generate(str(root), SynthSpec(ids=8, cams=2, images_per_cam=2, size=(32, 16), test_fraction=0.25),
                    layout=layout)


def test_captions_are_read_per_modality_and_matched_by_file_name(tmp_path):
    """Every layout's reader matches each sample's image name against its split's file per modality; the
    synthetic captions carry the identity's words most of the time."""
    root = tmp_path / "train_here"  # a root path with "train" in it reads the test split's own files
    _synth(root)
    data = RGBNT201.load(str(root), MODS, modality_captions=True)
    for split, samples in (("train", data.train), ("test", data.query)):
        files = {m: read_caption_file(str(root / "RGBNT201" / "text" / f"{split}_{THEIRS[m]}.json")) for m in MODS}
        for s in samples:
            name = os.path.basename(s.paths["rgb"])
            assert s.captions == {m: files[m][name] for m in MODS}
    for layout, cls in (("rgbnt100", RGBNT100), ("msvr310", MSVR310)):
        _synth(tmp_path / layout, layout)
        d = cls.load(str(tmp_path / layout), MODS, modality_captions=True)
        text = tmp_path / layout / ("RGBNT100/rgbir" if layout == "rgbnt100" else "MSVR310") / "text"
        for split, samples in (("train", d.train), ("test", d.query + d.gallery)):
            table = read_caption_file(str(text / f"{split}_NI.json"))
            assert all(s.captions["nir"] == table[os.path.basename(s.paths["nir"])] for s in samples), layout
    codes = json.load(open(root / "RGBNT201" / "synth.json"))["codes"]
    hue = ("red", "green", "blue", "yellow")
    said = [s.captions["rgb"] for s in data.train]
    right = [f"a {hue[codes[int(os.path.basename(s.paths['rgb'])[:6]) - 1][0] // 2]} top" in c
             for s, c in zip(data.train, said)]
    assert 0.55 < np.mean(right) < 0.9  # usually the identity's own colour, sometimes vague or another's
    assert any("wearing a top" in c for c in said)


def test_missing_caption_file_or_entry_is_an_error_or_their_empty_fallback(tmp_path):
    _synth(tmp_path)
    text = tmp_path / "RGBNT201" / "text"
    entries = json.load(open(text / "test_TI.json"))
    dropped = entries.pop(0)["item"]
    with open(text / "test_TI.json", "w") as f:
        json.dump(entries, f)
    with pytest.raises(DataError, match=rf"test_TI.json has no caption for {dropped}.*data.missing_caption=empty"):
        RGBNT201.load(str(tmp_path), MODS, modality_captions=True)
    data = RGBNT201.load(str(tmp_path), MODS, modality_captions=True, missing_caption="empty")
    assert next(s for s in data.query if s.paths["tir"].endswith(dropped)).captions["tir"] == ""
    os.remove(text / "train_NI.json")
    with pytest.raises(DataError, match=r"train_NI.json is missing.*QwenVL_Anno"):
        RGBNT201.load(str(tmp_path), MODS, modality_captions=True)
    with pytest.raises((ConfigError, ValueError), match="data.modality_captions=true"):
        load_config(METHOD, ["data.modality_captions=false"])
    bad = text / "test_RGB.json"  # malformed files: each an error naming the file
    for content, what in (('[{"item": "a.jpg", ', "is not valid JSON"), ('{"item": "a.jpg"}', "expected a JSON list"),
                          ('[{"item": "a.jpg", "caption": "x"}]', r"entry 0 is not \{\"item\""),
                          ('[{"item": "a.jpg", "description": 3}]', "entry 0 is not")):
        bad.write_text(content)
        with pytest.raises(DataError, match=rf"test_RGB.json.*{what}"):
            read_caption_file(str(bad))
    _synth(tmp_path / "v", "rgbnt100")  # the vehicle layouts name their own file too
    os.remove(tmp_path / "v" / "RGBNT100" / "rgbir" / "text" / "test_TI.json")
    with pytest.raises(DataError, match=r"RGBNT100/rgbir/text/test_TI.json is missing"):
        RGBNT100.load(str(tmp_path / "v"), MODS, modality_captions=True)
    _synth(tmp_path / "m", "msvr310")
    text = tmp_path / "m" / "MSVR310" / "text"
    entries = json.load(open(text / "train_RGB.json"))
    dropped = entries.pop()["item"]
    with open(text / "train_RGB.json", "w") as f:
        json.dump(entries, f)
    with pytest.raises(DataError, match=rf"MSVR310/text/train_RGB.json has no caption for {dropped}"):
        MSVR310.load(str(tmp_path / "m"), MODS, modality_captions=True)


def test_the_loader_delivers_each_modalitys_caption_ids(tmp_path):
    _synth(tmp_path)
    data = RGBNT201.load(str(tmp_path), MODS, modality_captions=True)
    model, _ = model_for()
    tf = PairedTransform((64, 32), (0.5,) * 3, (0.5,) * 3, train=True)
    loader = build_train_loader(data.train, MODS, tf, batch_size=4, num_instances=2, seed=0, num_workers=0,
                                tokenize=model.tokenizer)
    batch = next(iter(loader))
    for m in MODS:
        ids = batch["images"][caption_key(m)]
        assert ids.shape == (4, 77) and ids.dtype == torch.long
        i = int(batch["indices"][0])
        assert torch.equal(ids[0], model.tokenizer.caption(m, data.train[i].captions[m]))
    plain = RGBNT201.load(str(tmp_path), MODS)  # no captions read: the model says what it needs
    with pytest.raises(DataError, match="data.modality_captions=true"):
        build_train_loader(plain.train, MODS, tf, 4, 2, 0, 0, tokenize=model.tokenizer)


def test_missing_protocol_runs_with_zero_images_and_refuses_dropped_modalities(tmp_path):
    """``eval.protocol: missing`` with ``missing_fill: zeros`` (their TEST.MISS: the captions stay) runs on a
    tiny untrained IDEA; with ``drop`` the aggregation would lack a modality's map: refused up front."""
    from accelerate import Accelerator

    from hybrid_reid.data import load_data
    from hybrid_reid.engine.evaluator import Evaluator
    from hybrid_reid.engine.train import _transform, resolve_config

    over = [f"data.root={tmp_path}", "data.synth.ids=8", "data.synth.cams=2", "data.synth.images_per_cam=2",
            "data.synth.size=[32,16]", "data.synth.test_fraction=0.25", "data.cache_images=false", *QUICK,
            "model.backbone=clip", "eval.protocol=missing", "eval.missing_fill=zeros"]
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), over)
    data = load_data(cfg.data)
    cfg = resolve_config(cfg, data)
    model = build_model(cfg.model, modalities=data.modalities)
    ev = Evaluator(Accelerator(cpu=True), cfg, data, _transform(cfg, model, False), model.tokenizer,
                   handles_missing=model.modality_fusion.handles_missing)
    result = ev.run(model)
    assert set(result["missing"]) == {"r", "n", "t", "rn", "rt", "nt", "average"}
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), [*over, "eval.missing_fill=drop"])
    with pytest.raises(ValueError, match="needs every modality.*eval.missing_fill=zeros"):
        Evaluator(Accelerator(cpu=True), resolve_config(cfg, data), data, _transform(cfg, model, False),
                  model.tokenizer, handles_missing=False)
