"""The adapter: equality with open_clip / timm, checkpoint formats, strides, camera/view embedding."""
import os
import pickle

import open_clip
import pytest
import timm
import torch
from conftest import CLIP_OUT, TINY, tiny_open_clip

from hybrid_reid import BackboneOutput, create_backbone
from hybrid_reid.models import TOWERS, CheckpointError

SIZES = [(224, 224), (256, 128)]


def tiny(kind, **kw):
    extra = dict(out_dim=CLIP_OUT) if kind == "clip" else {}
    arch = "ViT-B-16-quickgelu" if kind == "clip" else "vit_base_patch16_224"
    return create_backbone(kind, arch=arch, **{**TINY, **extra, **kw})


@pytest.mark.parametrize("size", SIZES)
def test_clip_embed_equals_open_clip_encode_image(clip_ckpt, size):
    ref = tiny_open_clip(image_size=size).eval()  # == create_model(..., force_image_size=size)
    open_clip.load_checkpoint(ref, clip_ckpt)  # open_clip's own loader resizes the pos embedding
    ours = tiny("clip", pretrained=clip_ckpt, img_size=size).eval()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = ref.encode_image(x)
        got = ours.embed(x)
    assert got.shape == (3, CLIP_OUT)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("size", SIZES)
def test_vit_cls_equals_timm_forward_features(vit_ckpt, size):
    ref = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=vit_ckpt),
                            img_size=size, num_classes=0, embed_dim=64, depth=2, num_heads=2).eval()
    ours = tiny("vit", pretrained=vit_ckpt, img_size=size).eval()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        out = ours(x)
    assert isinstance(out, BackboneOutput)
    assert torch.allclose(out.cls, expected[:, 0], atol=1e-4)
    assert torch.allclose(out.patches, expected[:, 1:], atol=1e-4)
    assert torch.allclose(ours.embed(x), out.cls)  # ViT: embed is the normed CLS


def test_openai_torchscript_archive_loads_like_the_state_dict(clip_ckpt, clip_torchscript):
    a = tiny("clip", pretrained=clip_ckpt).eval()
    b = tiny("clip", pretrained=clip_torchscript).eval()
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(a.embed(x), b.embed(x))


def test_safetensors_and_transreid_layouts(vit_ckpt, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(vit_ckpt, weights_only=True)
    save_file(sd, str(tmp_path / "vit.safetensors"))
    # a TransReID-trained model: the ViT under base., plus its own camera table and heads
    transreid = {f"base.{k}": v for k, v in sd.items()}
    transreid.update({"base.sie_embed": torch.zeros(6, 1, 64), "classifier.weight": torch.zeros(10, 64),
                      "bottleneck.weight": torch.ones(64)})
    torch.save({"state_dict": transreid}, tmp_path / "transreid.pth")
    ref = tiny("vit", pretrained=vit_ckpt).eval()
    x = torch.randn(2, 3, 256, 128)
    for f in ("vit.safetensors", "transreid.pth"):
        other = tiny("vit", pretrained=str(tmp_path / f)).eval()
        with torch.no_grad():
            assert torch.equal(ref(x).cls, other(x).cls), f


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_stride_12_gives_21x10_and_reloads_its_own_grid(kind, clip_ckpt, vit_ckpt, tmp_path):
    ckpt = clip_ckpt if kind == "clip" else vit_ckpt
    b = tiny(kind, pretrained=ckpt, stride=12).eval()
    out = b(torch.randn(2, 3, 256, 128))
    assert out.grid == (21, 10) and out.patches.shape == (2, 210, 64) and out.cls.shape == (2, 64)
    assert b.tower.patch_embed.proj.stride == (12, 12)
    # the pos embedding was resized 14x14 -> 21x10, and a 21x10 checkpoint reloads as it is
    path = tmp_path / "strided.pth"
    torch.save(b.tower.state_dict() | ({"head.weight": b.proj.weight} if b.proj is not None else {}), path)
    again = tiny(kind, pretrained=str(path), stride=12).eval()
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(again(x).cls, b(x).cls)


def test_missing_and_mismatching_checkpoints_name_the_path_and_keys(vit_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found: /nope/ViT-B-16.pt"):
        tiny("clip", pretrained="/nope/ViT-B-16.pt")
    with pytest.raises(CheckpointError) as e:  # width 64 checkpoint into a width 32 tower
        create_backbone("vit", arch="vit_base_patch16_224", pretrained=vit_ckpt, width=32, layers=2, heads=2)
    assert vit_ckpt in str(e.value) and "cls_token" in str(e.value) and "(1, 1, 64)" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # a ViT checkpoint into the CLIP tower
        tiny("clip", pretrained=vit_ckpt)
    assert "missing ['norm_pre.weight'" in str(e.value)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"pos_embed": payload}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth"):
        tiny("vit", pretrained=str(path))
    assert not marker.exists()


def _captured_embedding_input(b, x, cams):
    """The tokens entering the first block's pre-norm: cat(cls, patches) + pos + SIE."""
    seen = {}
    h = b.tower.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
    h2 = b.tower.blocks[0].register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0].detach()))
    try:
        out = b(x, cam_ids=cams)
    finally:
        h.remove()
        h2.remove()
    return seen["x"], out


@pytest.mark.parametrize("kind", ["clip", "vit"])
@pytest.mark.parametrize("mode", ["all", "cls"])
def test_camera_embedding_both_modes_both_towers(kind, mode):
    torch.manual_seed(0)
    b = tiny(kind, num_cams=4, sie_coef=2.0, sie_mode=mode).eval()
    x = torch.randn(1, 3, 256, 128).expand(3, -1, -1, -1)  # same image, three cameras
    cams = torch.tensor([0, 1, 3])
    tok, out = _captured_embedding_input(b, x, cams)
    # the difference between cameras is exactly coef * (table[c] - table[c'])
    diff = tok[1] - tok[0]
    expected = 2.0 * (b.sie.table[1] - b.sie.table[0]).detach()
    assert torch.allclose(diff[0], expected, atol=1e-5)
    if mode == "all":
        assert torch.allclose(diff[1:], expected.expand_as(diff[1:]), atol=1e-5)
    else:
        assert diff[1:].abs().max() == 0
    assert not torch.allclose(out.cls[0], out.cls[1]) and not torch.allclose(out.cls[1], out.cls[2])
    # gradients reach only the rows used
    b.zero_grad()
    w = torch.randn(64)  # a random direction: the sum of a LayerNorm output is constant
    (b(x, cam_ids=torch.tensor([1, 3, 3])).cls @ w).sum().backward()
    used = b.sie.table.grad.abs().sum(dim=1) > 0
    assert used.tolist() == [False, True, False, True]


def test_camera_and_view_rows_and_bad_ids():
    b = tiny("vit", num_cams=3, num_views=2).eval()
    assert b.sie.table.shape == (6, 64)
    row = b.sie(torch.tensor([2]), torch.tensor([1]))
    assert torch.equal(row[0], b.sie.table[2 * 2 + 1])
    x = torch.randn(2, 3, 256, 128)
    with pytest.raises(ValueError, match="cam id 3 out of range.*num_cams=3"):
        b(x, cam_ids=torch.tensor([0, 3]), view_ids=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="view id -1 out of range"):
        b(x, cam_ids=torch.tensor([0, 1]), view_ids=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="pass cam_ids"):
        b(x)
    views_only = tiny("clip", num_views=5)
    assert views_only.sie.table.shape == (5, 64)
    views_only(x, view_ids=torch.tensor([4, 0]))


def test_no_camera_embedding_ignores_ids_and_towers_report_preprocessing():
    b = tiny("clip").eval()
    assert b.sie is None
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(b(x).cls, b(x, cam_ids=torch.tensor([0, 1])).cls)
    assert b.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and b.out_dim == CLIP_OUT and b.embed_dim == 64
    v = tiny("vit")
    assert v.mean == (0.5, 0.5, 0.5) and v.out_dim == 64 and v.proj is None


def test_bad_arch_kind_and_kwargs_are_clear_errors():
    assert TOWERS.names() == ["clip", "vit"]
    with pytest.raises(KeyError, match="Did you mean 'clip'"):
        create_backbone("clp", arch="ViT-B-16")
    with pytest.raises(ValueError, match="not an open_clip model name"):
        create_backbone("clip", arch="vit_base_patch16_224")
    with pytest.raises(ValueError, match="not a plain CLIP ViT"):
        create_backbone("clip", arch="RN50")
    with pytest.raises(ValueError, match="not a timm model name"):
        create_backbone("vit", arch="ViT-B-16")
    with pytest.raises(ValueError, match="did you mean 'layers'"):
        create_backbone("vit", arch="vit_base_patch16_224", width=64, layer=2, heads=2)
    with pytest.raises(ValueError, match="out_dim"):
        create_backbone("vit", arch="vit_base_patch16_224", width=64, layers=2, heads=2, out_dim=8)


def test_full_size_towers_are_vit_b16():
    """No weights: just the architecture the names promise (768-d tokens, CLIP 512-d projection)."""
    clip = create_backbone("clip", arch="ViT-B-16-quickgelu", img_size=(256, 128))
    vit = create_backbone("vit", arch="vit_base_patch16_224", img_size=(256, 128), stride=12)
    assert clip.embed_dim == vit.embed_dim == 768 and clip.out_dim == 512
    assert clip.grid == (16, 8) and vit.grid == (21, 10)
    assert sum(p.numel() for p in clip.tower.parameters()) == 85_747_200  # OpenAI visual minus proj


def test_deepcopy_keeps_the_camera_embedding_working():
    """EMA / teacher copies: the copy's hook must apply the copy's own table, not the original's."""
    import copy

    b = tiny("vit", num_cams=3, sie_coef=5.0).eval()
    c = copy.deepcopy(b)
    delta = torch.randn_like(c.sie.table)  # not a constant: LayerNorm would remove that
    saved = c.sie.table.detach().clone()
    with torch.no_grad():
        c.sie.table.add_(delta)
        x, cams = torch.randn(2, 3, 256, 128), torch.tensor([0, 2])
        assert not torch.allclose(b(x, cams).cls, c(x, cams).cls)
        c.sie.table.copy_(saved)
        assert torch.equal(b(x, cams).cls, c(x, cams).cls)
