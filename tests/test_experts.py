"""Modality experts on clip, vit and hybrid: tokenizers and MER LoRA (equal to peft's LoRA)."""
import copy
import warnings

import pytest
import torch

from hybrid_reid import build_model, create_backbone, load_config
from hybrid_reid.engine import build_optimizer
from hybrid_reid.models.checkpoint import load_model_weights

MODS = ["rgb", "nir", "tir"]
TINY_CFG = "configs/tiny.yaml"
EXPERTS = ["model.mer.enabled=true", "model.tokenizers.enabled=true", "model.num_cams=3", "model.num_classes=4"]


def expert_model(backbone, *extra):
    torch.manual_seed(0)
    cfg = load_config(TINY_CFG, [f"model.backbone={backbone}", *EXPERTS, *extra])
    return build_model(cfg.model, modalities=MODS), cfg


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(4, 3, 64, 32, generator=g) for m in MODS}, torch.tensor([0, 1, 2, 0]), \
        torch.tensor([0, 1, 2, 3])


def lora_b(model, m):
    return {n: p for n, p in model.named_parameters() if f"lora_B.{m}." in n}


def tokenizer(model, m):
    return {n: p for n, p in model.named_parameters() if f"patch_embed.embeds.{m}." in n}


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
def test_one_step_updates_every_modality_expert(backbone):
    model, cfg = expert_model(backbone)
    opt = build_optimizer(model, cfg.optim)
    before = {m: ({n: p.detach().clone() for n, p in lora_b(model, m).items()},
                  {n: p.detach().clone() for n, p in tokenizer(model, m).items()}) for m in MODS}
    images, cams, pids = batch()
    out = model(images, cams)
    torch.nn.functional.cross_entropy(out.logits, pids).backward()
    opt.step()
    towers = len(cfg.model.towers)
    for m in MODS:
        b_before, t_before = before[m]
        assert len(b_before) == towers * 2 * 4  # 2 blocks x (qkv, proj, fc1, fc2) per tower
        assert all(not torch.equal(p, b_before[n]) for n, p in lora_b(model, m).items()), m
        assert all(not torch.equal(p, t_before[n]) for n, p in tokenizer(model, m).items()), m


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
def test_mixed_batch_gradients_equal_one_modality_at_a_time(backbone):
    model, _ = expert_model(backbone)
    images, cams, _ = batch(1)
    mixed = model(images, cams)  # one pass, rows routed to their modality's tokenizer and adapter
    for m in MODS:
        alone = model({m: images[m]}, cams).modality_feats[m]
        assert torch.allclose(mixed.modality_feats[m], alone, atol=1e-5), m
    model.zero_grad()
    mixed.feat.pow(2).sum().backward()  # concat fusion: the sum splits over modalities
    together = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    model.zero_grad()
    for m in MODS:
        model({m: images[m]}, cams).feat.pow(2).sum().backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    assert set(together) == set(separate) and len(together) == len(list(model.named_parameters())) - \
        len([n for n, _ in model.named_parameters() if "lora_" not in n])
    for n in together:
        assert torch.allclose(together[n], separate[n], atol=1e-5), n


@pytest.mark.parametrize("kind,arch", [("clip", "ViT-B-16-quickgelu"), ("vit", "vit_base_patch16_224")])
def test_untrained_experts_equal_the_plain_tower(kind, arch):
    torch.manual_seed(0)
    plain = create_backbone(kind, arch=arch, img_size=(64, 32), num_cams=3, width=64, layers=2, heads=2).eval()
    adapted = copy.deepcopy(plain)
    adapted.experts.add_tokenizers({"rgb": 3, "nir": 3, "sketch": 1}, perturb_std=0.0)
    adapted.experts.add_lora(["rgb", "nir", "sketch"], rank=4, alpha=1.0)
    x, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 2])
    with torch.no_grad():
        ref = plain(x, cams).cls
        for m in ("rgb", "nir"):
            assert torch.equal(adapted(x, cams, modality=m).cls, ref), m
        grey = x.mean(1, keepdim=True)  # a 1-channel tokenizer is the sum of the RGB kernels
        assert torch.allclose(adapted(grey, cams, modality="sketch").cls, plain(grey.expand(-1, 3, -1, -1), cams).cls,
                              atol=1e-5)
        assert torch.allclose(adapted(grey, cams, modality="rgb").cls, plain(grey.expand(-1, 3, -1, -1), cams).cls,
                              atol=1e-5)  # 1 -> 3 channel adapter starts as replication
    perturbed = copy.deepcopy(plain)
    perturbed.experts.add_tokenizers({"rgb": 3, "nir": 3}, perturb_std=0.02)
    with torch.no_grad():
        assert torch.equal(perturbed(x, cams, modality="rgb").cls, ref)
        assert not torch.equal(perturbed(x, cams, modality="nir").cls, ref)  # non-RGB gets the seed's noise


@pytest.mark.parametrize("backbone", ["clip", "vit", "hybrid"])
def test_merged_inference_equals_unmerged(backbone):
    model, cfg = expert_model(backbone)
    opt = build_optimizer(model, cfg.optim)
    images, cams, pids = batch(2)
    for _ in range(2):  # make B non-zero
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images, cams).logits, pids).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref = model({"nir": images["nir"]}, cams).feat
        for b in model.encoder.backbones.values():
            b.experts.merge("nir")
        merged = model({"nir": images["nir"]}, cams).feat
        with pytest.raises(ValueError, match="merged into the weights"):
            model({"rgb": images["rgb"]}, cams)
        with pytest.raises(ValueError, match="no LoRA expert for modality 'sketch'"):
            next(iter(model.encoder.backbones.values())).experts.merge("sketch")
        for b in model.encoder.backbones.values():
            b.experts.unmerge()
        again = model({"nir": images["nir"]}, cams).feat
    assert (merged - ref).abs().max() < 1e-5 and (again - ref).abs().max() < 1e-5


def test_backbone_modes_and_checkpoint_round_trip(tmp_path):
    model, _ = expert_model("hybrid", "model.freeze_backbone=true")
    groups = model.param_groups()
    assert not groups["backbone"] and groups["lora"] and groups["tokenizers"]  # LoRA-only training
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(".blocks.0.attn.qkv.base_layer.weight" in n for n in frozen)
    assert not any("lora_" in n or "patch_embed.embeds" in n for n in frozen)
    full, _ = expert_model("hybrid")
    assert all(p.requires_grad for n, p in full.named_parameters() if "bnneck.bias" not in n)  # full fine-tune
    # adapters and tokenizers travel with the checkpoint
    with torch.no_grad():
        for n, p in full.named_parameters():
            if "lora_B" in n:
                p.normal_()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh, _ = expert_model("hybrid")
    load_model_weights(fresh, tmp_path / "m.safetensors")
    images, cams, _ = batch(3)
    full.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(full(images, cams).feat, fresh(images, cams).feat)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fresh.encoder.backbones["clip"].set_grad_checkpointing(True)


def test_lora_never_targets_the_patch_embedding_and_blocks_are_configurable():
    model, _ = expert_model("vit", "model.mer.blocks=[1]")
    names = [n for n, _ in model.named_parameters() if "lora_A.rgb" in n]
    assert names and all(".blocks.1." in n for n in names)
    assert not any("patch_embed" in n for n, _ in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="model.towers.vit: model.mer.blocks"):
        expert_model("vit", "model.mer.blocks=[5]")


def test_lora_experts_equal_peft_lora_with_the_same_weights():
    """Our routed LoRA layers compute peft's LoRA for the routed modality, with peft's key layout."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    ours = create_backbone("vit", arch="vit_base_patch16_224", img_size=(64, 32), width=64, layers=2, heads=2).eval()
    ref_tower = copy.deepcopy(ours.tower)
    ours.experts.add_lora(["rgb", "nir"], rank=4, alpha=2.0)
    config = LoraConfig(r=4, lora_alpha=2.0, target_modules=r"blocks\.(0|1)\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter, on purpose
        for m in ("rgb", "nir"):
            inject_adapter_in_model(config, ref_tower, adapter_name=m)
    assert set(ref_tower.state_dict()) == set(ours.tower.state_dict())  # peft's layout: checkpoints interchange
    with torch.no_grad():
        for n, p in ours.tower.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    ref_tower.load_state_dict(ours.tower.state_dict())
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        for m in ("rgb", "nir"):
            for layer in ref_tower.modules():
                if isinstance(layer, LoraLayer):
                    layer.set_adapter(m)
            expected = ref_tower.forward_features(x)[:, 0]
            got = ours(x, modality=m).cls
            assert torch.allclose(got, expected, atol=1e-5), (m, (got - expected).abs().max())


def test_routing_never_changes_parameters():
    """Switching modality is an attribute on the routed layers: requires_grad stays as built."""
    model, _ = expert_model("hybrid")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    images, cams, _ = batch(4)
    model(images, cams)
    model({"nir": images["nir"]}, cams)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(before[n] for n in before if "lora_" in n)
