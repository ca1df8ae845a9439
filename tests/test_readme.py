"""The README's examples run as written, and the numbers it quotes are the ones the code produces."""
import os
import re
import textwrap

import pytest
from conftest import ROOT, run_python

README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)]  # some sit in a list


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def _after_make_demo(cwd):
    """What a block that uses the demo's run expects: ``outputs/quickstart`` (a model folder of the
    quickstart's architecture, untrained here) and one image per modality."""
    import numpy as np
    import torch
    from PIL import Image

    from hybrid_reid import build_model, load_config

    cfg = load_config("quickstart", ["model.num_classes=30", "model.num_cams=4"])
    torch.manual_seed(0)
    build_model(cfg.model, modalities=cfg.data.modalities).save_pretrained(str(cwd / "outputs" / "quickstart"), cfg)
    rng = np.random.default_rng(0)
    for m in ("rgb", "nir", "tir"):
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(cwd / f"{m}.jpg")


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    """From an empty directory, not the repository: configs are found by name, files go where the user is."""
    if '"outputs/quickstart"' in BLOCKS[i]:
        _after_make_demo(tmp_path)
    r = run_python("-c", BLOCKS[i], cwd=tmp_path)
    assert r.returncode == 0, f"README python block {i} failed:\n{BLOCKS[i]}\n{r.stderr[-3000:]}"


def test_readme_info_output_is_current():
    """The `run.py info` listing quoted in the README is what the command prints today."""
    quoted = re.search(r"```\n(towers: clip, vit \(backbone hybrid\)  fusion: concat.*?)```", README,
                       flags=re.S).group(1)
    r = run_python("run.py", "info", "--config", "configs/hybrid.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == quoted.strip()
