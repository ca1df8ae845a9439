"""The text modality (CLIP text tower beside any image backbone) and any-combination queries."""
import pytest
import torch

from hybrid_reid import build_model, load_config
from hybrid_reid.data import SynthSpec, generate
from hybrid_reid.data.datasets import RGBNT201
from hybrid_reid.data.loader import MultiModalDataset
from hybrid_reid.data.transforms import PairedTransform
from hybrid_reid.models.text import TextEncoder

MODS = ["rgb", "nir", "tir", "text"]
TEXT_KW = dict(width=32, layers=1, heads=2, out_dim=64)


def test_text_tower_equals_open_clip_encode_text(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    ref = CLIP(embed_dim=64, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
               quick_gelu=True).eval()
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    text = TextEncoder("ViT-B-16-quickgelu", str(tmp_path / "clip.pt"), 77, **TEXT_KW).eval()
    ids = text.tokenize(["a person in a red top and dark trousers", "a person"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    with torch.no_grad():
        assert (text(ids) - ref.encode_text(ids)).abs().max() < 1e-5
    with pytest.raises(Exception, match="does not fit the text tower"):
        TextEncoder("ViT-B-16-quickgelu", str(tmp_path / "clip.pt"), 77, width=48, layers=1, heads=2, out_dim=64)


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
@pytest.mark.parametrize("mfusion,width", [("mean", 64), ("concat", 4 * 64)])
def test_text_only_single_and_mixed_queries_give_features(backbone, mfusion, width):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", [f"model.backbone={backbone}", f"model.modality_fusion={mfusion}",
                                            "model.mer.enabled=true", "model.tokenizers.enabled=true",
                                            "model.sdm.enabled=true", "model.sdm.semantic_dim=32", "model.num_cams=0"])
    model = build_model(cfg.model, modalities=MODS).eval()
    assert model.text_encoder is not None  # loaded beside any image backbone
    ids = model.text_encoder.tokenize(["a person in a red top", "a person in a blue top"])
    images = {m: torch.randn(2, 3, 64, 32) for m in MODS[:3]}
    with torch.no_grad():
        for q in [{"text": ids}, {"nir": images["nir"]}, {"rgb": images["rgb"], "text": ids},
                  {**images, "text": ids}]:
            out = model(q)
            assert out.feat.shape == (2, width) and torch.isfinite(out.feat).all(), list(q)
            assert set(out.modality_feats) == set(q) and all(f.shape == (2, 64) for f in out.modality_feats.values())
            assert set(out.semantic) == set(q)


def test_synthetic_captions_reach_the_batch(tmp_path):
    generate(str(tmp_path), SynthSpec(ids=8, cams=2, images_per_cam=1, size=(32, 16)))
    data = RGBNT201.load(str(tmp_path), ["rgb", "text"])
    assert data.modalities == ["rgb", "text"]
    assert all(s.text.startswith("a person in a ") and "stripes" in s.text for s in data.train + data.query)
    text = TextEncoder("ViT-B-16-quickgelu", None, 32, **TEXT_KW)
    ds = MultiModalDataset(data.query, data.modalities, PairedTransform((32, 16), (0.5,) * 3, (0.5,) * 3, False),
                           tokenize=text.tokenize)
    item = ds[0]
    assert item["images"]["text"].shape == (32,) and item["images"]["rgb"].shape == (3, 32, 16)
    plain = RGBNT201.load(str(tmp_path), ["rgb"])
    assert all(s.text is None for s in plain.train)
