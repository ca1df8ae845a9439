"""Fingerprints of the model every shipped config builds (tests/test_towers.py holds them fixed).

    python tests/scripts/model_fingerprints.py > tests/fixtures/model_fingerprints.json

For each YAML in configs/ and experiments/ (every variant of a sweep suite): build the model without
pretrained files and hash every state-dict entry's name, shape and dtype, plus each tower's grid,
camera-embedding mode and coefficient; for tiny models (under 5 M parameters) also the values of
the weights after torch.manual_seed(0).
Stochastic depth is left out (its ImageNet-ViT default changed on purpose; the test checks it
separately).
"""
import glob
import hashlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from hybrid_reid import build_model, load_config  # noqa: E402
from hybrid_reid.data import canonical_modality  # noqa: E402
from hybrid_reid.sweep import load_suite  # noqa: E402


def configs():
    suites = sorted(glob.glob("experiments/*.yaml"))
    for p in sorted(glob.glob("configs/**/*.yaml", recursive=True)) + [
            p for p in sorted(glob.glob("experiments/**/*.yaml", recursive=True)) if p not in suites]:
        yield p, p, []
    for p in suites:
        _, base, runs = load_suite(p)
        seen = set()
        for run in runs:  # the seed does not change what is built
            if run.variant not in seen:
                seen.add(run.variant)
                yield f"{p}:{run.variant}", base, run.overrides


def fingerprint(path, overrides):
    cfg = load_config(path, overrides)
    mods = [canonical_modality(m) for m in cfg.data.modalities]
    torch.manual_seed(0)
    return fingerprint_of(build_model(cfg.model, load_pretrained=False, modalities=mods), cfg)


def fingerprint_of(model, cfg):
    """The fingerprint of a model built right after ``torch.manual_seed(0)`` from ``cfg``."""
    tiny = max(cfg.model.img_size) <= 64
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        if tiny:
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    towers = {t: {"grid": list(b.grid), "sie": None if b.sie is None else [b.sie.mode, b.sie.coef],
                  "embed_dim": b.embed_dim} for t, b in model.encoder.backbones.items()}
    return {"state": h.hexdigest(), "towers": towers}


if __name__ == "__main__":
    only = sys.argv[1:]
    out = {}
    for name, path, overrides in configs():
        if only and not any(o in name for o in only):
            continue
        out[name] = fingerprint(path, overrides)
    print(json.dumps(out, indent=1, sort_keys=True))
