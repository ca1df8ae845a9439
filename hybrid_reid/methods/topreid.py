"""TOP-ReID (AAAI 2024; github 924973292/TOP-ReID) checkpoints in this project's layout.

The authors save ``TOPReID.state_dict()``: one complete tower per modality under ``RGB.``, ``NI.``,
``TI.`` (their TransReID ViT as ``<M>.base.*`` with its camera table ``sie_embed`` and an unused
1000-way ``fc``; the tower's own BNNeck / classifier ``<M>.bottleneck`` / ``<M>.classifier``, which only
``DIRECT: 0`` trains), the token permutation ``TPM.Ro_{start,middle,end}.Rotation.*``, the reconstruction
``CRM.{RGB,NI,TI}RE.{re1,re2}.blocks.<i>.*`` (re1 / re2: the first / second other modality in the order
RGB, NI, TI), and the heads ``bottleneck_TPM`` / ``classifier_TPM`` (the TPM feature) and
``bottleneck_ViT`` / ``classifier_ViT`` (the concatenated class tokens, ``DIRECT: 1``).

In this project (``configs/methods/topreid*.yaml``) the towers are the per-modality copies
``encoder.backbones.vit.<rgb|nir|tir>`` (``model.share_towers: false``), TPM and CRM are
``modality_fusion.tpm.vit`` / ``modality_fusion.crm.vit``, the TPM feature's head is ``head``, the
concatenation's ``extra_heads.ori`` and the per-modality heads ``extra_heads.<rgb|nir|tir>``.
"""
from __future__ import annotations

import re
from typing import Dict

from . import LAYOUTS, Converted, Layout, StateDict

THEIRS = {"RGB": "rgb", "NI": "nir", "TI": "tir"}  # their modality names, in their order
TOWER = "vit"
STAGES = {"Ro_start": 0, "Ro_middle": 1, "Ro_end": 2}
TPM_PARTS = {"attn.normy.": "attn.norm_kv.", "attn.q_.": "attn.q.", "attn.k_.": "attn.k.", "attn.v_.": "attn.v."}


def detect(sd: StateDict) -> bool:
    keys = {k[len("module."):] if k.startswith("module.") else k for k in sd}
    return all(f"{m}.base.cls_token" in keys for m in THEIRS) and (
        any(k.startswith("TPM.") for k in keys) or "classifier_TPM.weight" in keys)


def _tpm(rest: str) -> str:
    m = re.fullmatch(r"(Ro_start|Ro_middle|Ro_end)\.Rotation\.(.*)", rest)
    if m is None:
        raise KeyError(f"TPM.{rest}")
    part = m.group(2)
    for theirs, ours in TPM_PARTS.items():
        if part.startswith(theirs):
            part = ours + part[len(theirs):]
            break
    return f"modality_fusion.tpm.{TOWER}.stages.{STAGES[m.group(1)]}.{part}"


def _crm(rest: str) -> str:
    m = re.fullmatch(r"(RGB|NI|TI)RE\.re([12])\.blocks\.(\d+)\.(.*)", rest)
    if m is None:
        raise KeyError(f"CRM.{rest}")
    src = THEIRS[m.group(1)]
    tgt = [t for t in THEIRS.values() if t != src][int(m.group(2)) - 1]
    return f"modality_fusion.crm.{TOWER}.rebuild.{src}.{tgt}.{m.group(3)}.{m.group(4)}"


def convert(sd: StateDict) -> Converted:
    """Their ``TOPReID.state_dict()`` -> this project's keys (``configs/methods/topreid*.yaml``)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out: Dict[str, object] = {}
    unused = []
    heads = {"bottleneck_TPM.": "head.bnneck.", "classifier_TPM.": "head.classifier.",
             "bottleneck_ViT.": "extra_heads.ori.bnneck.", "classifier_ViT.": "extra_heads.ori.classifier."}
    for k, v in sd.items():
        first, _, rest = k.partition(".")
        if first in THEIRS:
            m = THEIRS[first]
            if rest == "base.sie_embed":
                out[f"encoder.backbones.{TOWER}.{m}.sie.table"] = v.flatten(1)
            elif rest.startswith("base.fc."):
                unused.append(k)  # their ViT's 1000-way ImageNet head, never called
            elif rest.startswith("base."):
                out[f"encoder.backbones.{TOWER}.{m}.tower.{rest[len('base.'):]}"] = v
            elif rest.startswith("bottleneck."):
                out[f"extra_heads.{m}.bnneck.{rest[len('bottleneck.'):]}"] = v
            elif rest.startswith("classifier."):
                out[f"extra_heads.{m}.classifier.{rest[len('classifier.'):]}"] = v
            else:
                raise KeyError(k)
        elif first == "TPM":
            out[_tpm(rest)] = v
        elif first == "CRM":
            out[_crm(rest)] = v
        else:
            theirs = next((h for h in heads if k.startswith(h)), None)
            if theirs is None:
                raise KeyError(k)
            out[heads[theirs] + k[len(theirs):]] = v
    return Converted(out, unused, [])


LAYOUTS.register("topreid")(Layout("topreid", detect, convert,
                                   "TOP-ReID (AAAI 2024) state_dict: RGB.base.*, NI.base.*, TI.base.*, TPM.*, CRM.*"))
