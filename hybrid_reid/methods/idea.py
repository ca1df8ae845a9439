"""IDEA (CVPR 2025; github 924973292/IDEA) checkpoints in this project's layout.

The authors save ``IDEA.state_dict()``: their CLIP under ``BACKBONE.base.`` (the image tower's OpenAI
``visual.*`` keys plus ``visual.new_positional_embedding``, the inverted-text token's position; the
text tower's ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``; the ``text_prompt`` vectors; an unused ``logit_scale``), the camera table
``BACKBONE.cv_embed`` [C, 1, D], the InverseNet ``BACKBONE.inverseNet.fc{1,2}``, the aggregation
``CDA.da_group.0.*`` (1x1 convolutions ``proj_{q,k,v,out}``, the offset network ``conv_offset``) and
the heads: ``bottleneck_textual`` / ``textual_classifier`` (LOCAL_t), ``bottleneck_visual`` /
``visual_classifier`` (LOCAL_v), and ``bottleneck_{v,t}`` / ``classifier_{v,t}`` (``DIRECT: 1``) or
``bottleneck_{v,t}_{rgb,nir,tir}`` / ``classifier_*`` (``DIRECT: 0``).

In this project (``configs/methods/idea*.yaml``) the image tower is ``encoder.backbones.clip`` (its
text-token slot ``....text_token.pos``), the text side ``inverted_text`` (``.text.tower.*``,
``.prompts``, ``.inverse.clip.*``), the aggregation ``modality_fusion.aggregators.clip`` (linear
``q, k, v, out``, ``offset``), LOCAL_t's head ``head`` and the others ``extra_heads.{vv, v, t, v_<m>,
t_<m>}``.
"""
from __future__ import annotations

from typing import Dict

from ..models.checkpoint import _openai_to_timm
from . import LAYOUTS, Converted, Layout, StateDict

TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
HEADS = {"bottleneck_textual.": "head.bnneck.", "textual_classifier.": "head.classifier.",
         "bottleneck_visual.": "extra_heads.vv.bnneck.", "visual_classifier.": "extra_heads.vv.classifier.",
         "bottleneck_v.": "extra_heads.v.bnneck.", "classifier_v.": "extra_heads.v.classifier.",
         "bottleneck_t.": "extra_heads.t.bnneck.", "classifier_t.": "extra_heads.t.classifier."}
for _kind in ("v", "t"):
    for _m in ("rgb", "nir", "tir"):
        HEADS[f"bottleneck_{_kind}_{_m}."] = f"extra_heads.{_kind}_{_m}.bnneck."
        HEADS[f"classifier_{_kind}_{_m}."] = f"extra_heads.{_kind}_{_m}.classifier."


def detect(sd: StateDict) -> bool:
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    return any(k.startswith(("BACKBONE.inverseNet.", "CDA.da_group.", "bottleneck_textual.")) or
               k == "BACKBONE.base.text_prompt" for k in keys)


def convert(sd: StateDict) -> Converted:
    """Their ``IDEA.state_dict()`` -> this project's keys (``configs/methods/idea*.yaml``, the CLIP tower)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    base = {k[len("BACKBONE.base."):]: v for k, v in sd.items() if k.startswith("BACKBONE.base.")}
    tower = "clip"
    prefix = f"encoder.backbones.{tower}."
    out: Dict[str, object] = {}
    unused, notes = [], []
    visual = {f"{k}": v for k, v in base.items() if k.startswith("visual.") and k != "visual.new_positional_embedding"}
    if "visual.class_embedding" not in visual:
        raise KeyError("BACKBONE.base.visual.class_embedding")  # their ImageNet-ViT build does not run at all
    timm_sd = _openai_to_timm(visual, None)
    out[f"{prefix}proj.weight"] = timm_sd.pop("head.weight")
    for k, v in timm_sd.items():
        out[f"{prefix}tower.{k}"] = v
    if "visual.new_positional_embedding" in base:
        out[f"{prefix}text_token.pos"] = base["visual.new_positional_embedding"]
    if "BACKBONE.cv_embed" in sd:
        out[f"{prefix}sie.table"] = sd["BACKBONE.cv_embed"].flatten(1)
    for k, v in base.items():
        if k.startswith(TEXT_KEYS):
            out[f"inverted_text.text.tower.{k}"] = v
        elif k == "text_prompt":
            out["inverted_text.prompts"] = v
        elif not k.startswith("visual."):
            unused.append(f"BACKBONE.base.{k}")  # logit_scale: trained by nobody, used by nothing
    for k, v in sd.items():
        if k.startswith("BACKBONE.inverseNet."):
            out[f"inverted_text.inverse.{tower}.{k[len('BACKBONE.inverseNet.'):]}"] = v
        elif k.startswith("CDA.da_group."):
            index, rest = k[len("CDA.da_group."):].split(".", 1)
            if index != "0":
                raise KeyError(k)  # their window is the whole map: one aggregation
            agg = f"modality_fusion.aggregators.{tower}."
            if rest.startswith("conv_offset."):
                out[agg + "offset." + rest[len("conv_offset."):]] = v
            elif rest.startswith("proj_"):
                name, param = rest[len("proj_"):].split(".", 1)
                out[f"{agg}{name}.{param}"] = v.flatten(1) if param == "weight" else v  # 1x1 conv -> linear
            else:
                raise KeyError(k)  # the unshared offsets (DA_SHARE: False) are not built here
        else:
            for theirs, ours in HEADS.items():
                if k.startswith(theirs):
                    out[ours + k[len(theirs):]] = v
                    break
    notes.append("IDEA: the text tower, its prompts and the InverseNet under inverted_text, the aggregation under "
                 "modality_fusion.aggregators.clip")
    return Converted(out, unused, notes)


LAYOUTS.register("idea")(Layout("idea", detect, convert,
                                "IDEA (CVPR 2025) state_dict: BACKBONE.base.* with text_prompt, BACKBONE.inverseNet.*, "
                                "CDA.*"))
