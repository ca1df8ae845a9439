"""Shared fixtures: tiny random-init towers saved in the real checkpoint formats."""
import os
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=64, layers=2, heads=2)
CLIP_OUT = 32


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; every in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_python(*args, timeout=300, cwd=None):
    """Run ``python ARGS`` in the repository root (or ``cwd``, importing this checkout), offline,
    capturing text output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cwd is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def tiny_open_clip(image_size=(224, 224)):
    """An open_clip CLIP with a 2-layer, width-64 image tower (QuickGELU, as OpenAI's)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(embed_dim=CLIP_OUT,
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=image_size),
                text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                quick_gelu=True)


def tiny_timm_vit(**kw):
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=64, depth=2, num_heads=2, **kw)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def clip_ckpt(ckpt_dir):
    """open_clip state dict of a tiny CLIP (224x224 pretraining grid), with non-trivial embeddings."""
    torch.manual_seed(0)
    m = tiny_open_clip()
    with torch.no_grad():  # make every part matter: random class/pos embeddings
        m.visual.class_embedding.normal_()
        m.visual.positional_embedding.normal_(std=0.5)
    path = ckpt_dir / "tiny_clip.pt"
    torch.save(m.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def clip_torchscript(ckpt_dir, clip_ckpt):
    """A TorchScript archive with OpenAI's ``visual.*`` key layout (like ViT-B-16.pt)."""
    m = tiny_open_clip()
    m.load_state_dict(torch.load(clip_ckpt, weights_only=True))

    class Wrapper(torch.nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Wrapper(m.visual).eval(), torch.randn(1, 3, 224, 224), check_trace=False)
    path = ckpt_dir / "tiny_clip_openai.pt"
    torch.jit.save(traced, str(path))
    return str(path)


@pytest.fixture(scope="session")
def vit_ckpt(ckpt_dir):
    """timm state dict of a tiny ImageNet ViT (with its 1000-class head, like jx_vit_base_p16_224)."""
    torch.manual_seed(1)
    m = tiny_timm_vit()
    with torch.no_grad():
        m.pos_embed.normal_(std=0.5)
        m.cls_token.normal_()
    path = ckpt_dir / "tiny_vit.pth"
    torch.save(m.state_dict(), path)
    return str(path)
