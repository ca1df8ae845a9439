"""The text modality: open_clip's CLIP tokenizer and text tower, usable beside any image backbone.

``TextEncoder(texts -> token ids -> [B, embed_dim])`` wraps open_clip's ``TextTransformer`` (the
same module and state-dict keys as a CLIP model's text half, so CLIP checkpoints load as they are)
and its BPE tokenizer (shipped with open_clip; nothing is downloaded).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, read_state_dict, state_dict_problems

logger = logging.getLogger(__name__)

_TEXT_KWARGS = ("width", "layers", "heads", "out_dim")


class TextEncoder(nn.Module):
    """CLIP text tower + tokenizer.

    Args:
        arch: open_clip model name whose text config is used (``ViT-B-16-quickgelu``).
        pretrained: a CLIP checkpoint (OpenAI TorchScript or open_clip state dict; image keys are
            ignored), or None for random init.
        context_length: tokens per caption (CLIP: 77).
        **tower_kwargs: ``width``, ``layers``, ``heads``, ``out_dim`` overrides (tiny test towers).
    """

    def __init__(self, arch: str = "ViT-B-16-quickgelu", pretrained: Optional[str] = None,
                 context_length: int = 77, **tower_kwargs: Any) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower

        unknown = [k for k in tower_kwargs if k not in _TEXT_KWARGS]
        if unknown:
            raise ValueError(f"unknown text tower_kwargs key {unknown[0]!r} (valid: {', '.join(_TEXT_KWARGS)})")
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {arch!r} for the text tower")
        text_cfg = {**cfg["text_cfg"], "context_length": context_length,
                    **{k: v for k, v in tower_kwargs.items() if k in ("width", "layers", "heads")}}
        self.embed_dim: int = int(tower_kwargs.get("out_dim", cfg["embed_dim"]))
        self.tower = _build_text_tower(self.embed_dim, CLIPTextCfg(**text_cfg), quick_gelu=cfg.get("quick_gelu", False))
        self._tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
        self.context_length = context_length
        if pretrained:
            self.load(pretrained)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Captions -> token ids ``[B, context_length]`` (long)."""
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [B, L] -> CLIP text features [B, embed_dim]."""
        return self.tower(token_ids)

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Load the text half of a CLIP checkpoint, strictly."""
        path = os.fspath(path)
        sd = read_state_dict(path)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items()
              if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias", "input_resolution",
                                                             "context_length", "vocab_size")}
        own = self.tower.state_dict()
        if "positional_embedding" in sd and sd["positional_embedding"].shape[0] != own["positional_embedding"].shape[0]:
            sd["positional_embedding"] = sd["positional_embedding"][:own["positional_embedding"].shape[0]]
        problems = state_dict_problems(own, sd)
        if problems:
            raise CheckpointError(f"{path} does not fit the text tower ({'; '.join(problems)}); check model.text.arch "
                                  "and tower_kwargs")
        self.tower.load_state_dict(sd, strict=True)
        logger.info("loaded the text tower from %s", path)

