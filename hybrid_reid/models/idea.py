"""IDEA (CVPR 2025): inverted text and cooperative deformable aggregation.

Re-implemented from the IDEA paper and its public code (github 924973292/IDEA); the tests hold every
part equal to the authors' code run on tiny random weights (``tests/fixtures/idea``). Two parts:

* **Inverted text** (:class:`InvertedText`, ``model.inverted_text``): every image modality m of a
  sample has its own caption. It is written into a template whose ``P`` placeholder words ("X")
  carry learnable prompt vectors, ``"An image of a X X person in the visible spectrum, ...: " +
  caption``, and read by a frozen CLIP text tower: the prompts are added to the placeholders' token
  embeddings, and the caption's global feature ``g_m`` is the mean of the tower's output at the
  end-of-text token and at the placeholders. An MLP (the *InverseNet*, ``E -> 4E -> D``, GELU,
  dropout) turns ``g_m`` into a token ``u_m`` of the image tower's width, which the tower takes as one
  more input token (:class:`~hybrid_reid.models.backbone.TextTokenSlot`). The tower's output there,
  projected like the class token, is the modality's *text-guided* feature ``T_m``; its class token
  gives the visual feature ``V_m`` and its patches the map ``F_m``.
* **Cooperative deformable aggregation** (:class:`CooperativeDeformableAggregation`,
  ``model.modality_fusion: cda``): one offset network reads every modality's patch map at once and
  predicts a small set of sampling points shared by the modalities (a depthwise ``ksize`` /
  ``stride`` convolution gives one point per window, moved by ``tanh`` offsets); each modality's map
  is sampled there bilinearly, and the 2M global features ``[V_1..V_M, T_1..T_M]`` attend to the
  3 x points samples (one head, residual). The refined V's concatenated are ``LOCAL_v``, the T's
  ``LOCAL_t``.

The text tower is CLIP's because the captions must be read by a text encoder whose features the
InverseNet can map; the image tower can be any ViT-family tower with an extra token (the InverseNet
maps into its width), so IDEA runs here on CLIP, ImageNet ViTs and hybrids.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import is_text
from .fusion import MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerInfo

#: the words before the prompt placeholders in every template
PREFIX = "An image of a "

#: IDEA's modality templates ("modal prefix"): what follows the placeholders, per modality
TEMPLATES: Dict[str, Dict[str, str]] = {
    "person": {  # RGBNT201
        "rgb": "person in the visible spectrum, capturing natural colors and fine details: ",
        "nir": "person in the near infrared spectrum, capturing contrasts and surface reflectance: ",
        "tir": "person in the thermal infrared spectrum, capturing heat emissions as temperature gradients: ",
    },
    "vehicle": {  # MSVR310
        "rgb": "vehicle in the visible spectrum, capturing natural colors and fine details: ",
        "nir": "vehicle in the near infrared spectrum, capturing contrasts and surface reflectance: ",
        "tir": "vehicle in the thermal infrared spectrum, capturing heat emissions as temperature gradients: ",
    },
    "vehicle_short": {  # RGBNT100
        "rgb": "vehicle in the visible spectrum: ",
        "nir": "vehicle in the near infrared spectrum: ",
        "tir": "vehicle in the thermal infrared spectrum: ",
    },
}


def template_bodies(template: str, bodies: Optional[Dict[str, str]], modalities: Sequence[str]) -> Dict[str, str]:
    """The text after the placeholders for each image modality: the named template's, with ``bodies``
    over it; a modality without one is an error naming the keys to set."""
    if template not in TEMPLATES and template != "custom":
        raise ValueError(f"model.inverted_text.template: {template!r} is not one of {sorted(TEMPLATES)} or 'custom'")
    out = {**TEMPLATES.get(template, {}), **(bodies or {})}
    lacking = [m for m in modalities if m not in out]
    if lacking:
        raise ValueError(f"model.inverted_text: the {template!r} template has no text for modality {lacking[0]!r}; "
                         f"add it in model.inverted_text.bodies (e.g. {{{lacking[0]}: 'person seen in ...: '}})")
    return {m: out[m] for m in modalities}


class CaptionTokenizer:
    """Per-modality captions -> token ids, in the template (picklable, for loader workers).

    ``caption(m, description)`` gives [L] ids of ``PREFIX + "X " * P + body[m] + description`` (CLIP
    BPE, ``<start>`` ... ``<end>``, zero-padded; a longer caption is cut to L with ``<end>`` last);
    calling it tokenises plain texts for the ``text`` modality (``text`` tokenizer), when the model has one.
    """

    def __init__(self, tokenizer, bodies: Dict[str, str], prompt_length: int,
                 text: Optional[Callable] = None) -> None:
        self.tokenizer, self.bodies, self.prompt_length, self.text = tokenizer, dict(bodies), prompt_length, text

    def caption_text(self, modality: str, description: str) -> str:
        if modality not in self.bodies:
            raise ValueError(f"no caption template for modality {modality!r} (model.inverted_text.bodies)")
        return PREFIX + "X " * self.prompt_length + self.bodies[modality] + description

    def caption(self, modality: str, description: str) -> torch.Tensor:
        return self.tokenizer([self.caption_text(modality, description)])[0]

    def __call__(self, texts):
        if self.text is None:
            raise ValueError("this model has no text modality to tokenise plain texts for")
        return self.text(texts)


class InverseNet(nn.Module):
    """``Linear(E, H) -> GELU -> Dropout -> Linear(H, D) -> Dropout``: a caption's global feature into
    an image tower's token width."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InvertedText(nn.Module):
    """IDEA's text side: a frozen CLIP text tower with learnable prompts, and an InverseNet per image tower.

    Args:
        text: the CLIP text tower and tokenizer (:class:`~hybrid_reid.models.text.TextEncoder`); frozen here.
        towers: ``{tower: D}`` the image towers' widths (one InverseNet each).
        modalities: the image modalities (each gets its template body).
        prompt_length: P, learnable prompt vectors (IDEA: 2 on RGBNT201, 1 on the vehicle sets);
            init N(0, 1).
        hidden_ratio: the InverseNet's hidden width / E (IDEA: 4).
        dropout: the InverseNet's dropout (IDEA: 0.1).
        template, bodies: the modality templates (:data:`TEMPLATES`; ``bodies`` adds or replaces).
    """

    def __init__(self, text: nn.Module, towers: Dict[str, int], modalities: Sequence[str], prompt_length: int = 2,
                 hidden_ratio: float = 4.0, dropout: float = 0.1, template: str = "person",
                 bodies: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self.text = text.requires_grad_(False)
        tok = text._tokenizer
        if not hasattr(tok, "encode"):
            raise ValueError(f"model.inverted_text needs CLIP's BPE tokenizer (model.text.arch); got "
                             f"{type(tok).__name__}")
        self.bodies = template_bodies(template, bodies, modalities)
        self.prompt_length = prompt_length
        # the placeholders' positions: after <start> and the prefix's words (IDEA: 5 .. 5+P-1)
        self.prompt_start = 1 + len(tok.encode(PREFIX))
        probe = tok([PREFIX + "X " * prompt_length])[0]
        x_id = tok.encode("X")[0]
        if prompt_length and not bool((probe[self.prompt_start:self.prompt_start + prompt_length] == x_id).all()):
            raise ValueError("the prompt placeholders are not where the template puts them")  # a tokenizer change
        width = text.tower.width
        self.prompts = nn.Parameter(torch.randn(prompt_length, width)) if prompt_length > 0 else None
        e = text.embed_dim
        self.inverse = nn.ModuleDict({t: InverseNet(e, int(round(e * hidden_ratio)), d, dropout)
                                      for t, d in towers.items()})

    def tokenizer(self, text: Optional[Callable] = None) -> CaptionTokenizer:
        """The loaders' tokenizer (``text``: the ``text`` modality's, kept for plain captions)."""
        return CaptionTokenizer(self.text._tokenizer, self.bodies, self.prompt_length, text)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the text tower's output at every position, projected: [B, L, E].

        The prompt vectors are added to the token embeddings at the placeholders; the causal mask lets
        a placeholder see only what precedes it, the end-of-text token everything."""
        tower = self.text.tower
        length = ids.shape[1]
        x = tower.token_embedding(ids)
        if self.prompts is not None:
            s = self.prompt_start
            x = x + F.pad(self.prompts, (0, 0, s, length - s - self.prompt_length)).to(x.dtype)
        x = x + tower.positional_embedding[:length].to(x.dtype)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.ln_final(tower.transformer(x, attn_mask=mask))
        proj = tower.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def global_feature(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> g [B, E]: the mean of the output at the end-of-text token (the largest id) and at
        the P placeholders."""
        feats = self.encode(ids)
        eot = feats[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        if self.prompts is None:
            return eot
        s = self.prompt_start
        return torch.cat([eot.unsqueeze(1), feats[:, s:s + self.prompt_length]], dim=1).mean(dim=1)

    def forward(self, captions: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """{modality: ids [B, L]} -> {modality: {tower: u [B, D_t]}} (all modalities in one text-tower pass)."""
        mods = list(captions)
        g = self.global_feature(torch.cat([captions[m] for m in mods]))
        u = {t: net(g).chunk(len(mods)) for t, net in self.inverse.items()}
        return {m: {t: u[t][i] for t in self.inverse} for i, m in enumerate(mods)}


# ----------------------------------------------------------------------------------------------- CDA
class DeformableAggregation(nn.Module):
    """IDEA's deformable aggregation on one tower's patch grid (their ``DAttentionBaseline``, one head,
    one group, the window the whole map, offsets shared by the modalities).

    Offsets: ``Conv1x1(M*C -> C) -> GELU -> depthwise Conv(ksize, stride) -> GELU -> Conv1x1(C -> 2, no
    bias)`` on the channel-stacked maps gives (dy, dx) at Hk x Wk windows; ``tanh * (1/(Hk-1), 1/(Wk-1))
    * offset_factor`` moves the windows' reference points (``i * stride + ksize // 2`` in patch units,
    normalised with the align-corners convention), clamped to [-1, 1]. Every map is sampled there
    (bilinear, align corners). The queries attend to the M x Hk x Wk samples: ``q, k, v`` linear maps,
    softmax(q k^T / sqrt(C)), output linear map, added to the queries.

    Args:
        num_maps: M modalities. dim: C. grid: (h, w). ksize, stride: the offset windows (IDEA: 4, 2).
        offset_factor: the offset range (IDEA: RGBNT201 5, RGBNT100 21, MSVR310 25; 0 = no offsets).
    """

    def __init__(self, num_maps: int, dim: int, grid: Tuple[int, int], ksize: int = 4, stride: int = 2,
                 offset_factor: float = 5.0) -> None:
        super().__init__()
        h, w = grid
        self.grid, self.ksize, self.stride, self.offset_factor = (h, w), ksize, stride, float(offset_factor)
        self.points = ((h - ksize) // stride + 1, (w - ksize) // stride + 1)
        if min(self.points) < 1:
            raise ValueError(f"the cda fusion's offset windows (ksize {ksize}, stride {stride}) do not fit the {h}x{w} "
                             "patch grid; set smaller ksize / stride in model.modality_fusion_kwargs")
        self.offset = nn.Sequential(
            nn.Conv2d(num_maps * dim, dim, 1), nn.GELU(),
            nn.Conv2d(dim, dim, ksize, stride, 0, groups=dim), nn.GELU(),
            nn.Conv2d(dim, 2, 1, bias=False))
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim ** -0.5
        hk, wk = self.points
        ys = (torch.arange(hk, dtype=torch.float32) * stride + ksize // 2) / max(h - 1, 1) * 2 - 1
        xs = (torch.arange(wk, dtype=torch.float32) * stride + ksize // 2) / max(w - 1, 1) * 2 - 1
        self.register_buffer("reference", torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1), persistent=False)
        # a one-point axis (Hk or Wk = 1) gets the range of two points instead of IDEA's division by zero
        self.register_buffer("offset_range", torch.tensor([1 / max(hk - 1, 1), 1 / max(wk - 1, 1)]).view(1, 2, 1, 1),
                             persistent=False)

    def sampling_points(self, maps: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """maps M x [B, C, h, w] -> ``raw`` [B, 2, Hk, Wk] (dy, dx before tanh), ``offset`` and ``pos``
        [B, Hk, Wk, 2] (y, x; ``pos`` clamped to [-1, 1])."""
        raw = self.offset(torch.cat(list(maps), dim=1))
        ref = self.reference.to(raw.dtype).expand(raw.shape[0], -1, -1, -1)
        if self.offset_factor > 0:
            offset = (raw.tanh() * self.offset_range.to(raw.dtype) * self.offset_factor).permute(0, 2, 3, 1)
        else:
            offset = torch.zeros_like(ref)
        return {"raw": raw, "offset": offset, "pos": (ref + offset).clamp(-1.0, 1.0)}

    def sample(self, maps: Sequence[torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
        """Every map at ``pos`` (shared): [B, C, M * Hk * Wk], modality after modality, row-major."""
        grid = pos[..., (1, 0)]  # (y, x) -> grid_sample's (x, y)
        return torch.cat([F.grid_sample(m, grid.to(m.dtype), mode="bilinear", align_corners=True).flatten(2)
                          for m in maps], dim=-1)

    def forward(self, maps: Sequence[torch.Tensor], queries: torch.Tensor,
                parts: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """maps M x [B, C, h, w], queries [B, Q, C] -> [B, Q, C]; ``parts`` (a dict) receives the
        intermediates (``raw``, ``offset``, ``pos``, ``sampled``, ``attn``)."""
        pts = self.sampling_points(maps)
        sampled = self.sample(maps, pts["pos"]).transpose(1, 2)  # [B, S, C]
        attn = (self.q(queries) @ self.k(sampled).transpose(1, 2) * self.scale).softmax(dim=-1)
        out = queries + self.out(attn @ self.v(sampled))
        if parts is not None:
            parts.update(pts, sampled=sampled.transpose(1, 2), attn=attn)
        return out


#: the retrieval features IDEA's test loops rank (``test_feat``), from the eval dict's keys
TEST_FEATS = ("local_t", "local_v", "local", "v", "t", "globals", "globals+local")


@MODALITY_FUSIONS.register("cda")
class CooperativeDeformableAggregation(ModalityFusion):
    """IDEA's cooperative deformable aggregation as a modality fusion.

    Per sample, with every modality's visual feature ``V_m`` (the shared-space feature: the class
    token, projected), its text-guided feature ``T_m`` (the inverted-text token's output, projected;
    ``model.inverted_text``) and its patch map: the 2M queries ``[V_1..V_M, T_1..T_M]`` attend to the
    maps sampled at shared deformable points (:class:`DeformableAggregation`, one per tower, averaged
    over towers). Outputs:

    * ``feat`` = ``LOCAL_t``, the refined T's concatenated [B, M*F], with the model's head (their
      ``bottleneck_textual``); without text tokens (``text: false``, their unused ``IDEA_woText``)
      ``LOCAL_v``;
    * branches, each with a BNNeck, a classifier and the ID / triplet losses: ``vv`` = ``LOCAL_v``,
      and ``direct: true`` (RGBNT201, MSVR310): ``v`` = [V_1..V_M], ``t`` = [T_1..T_M]; ``direct:
      false`` (RGBNT100): ``v_<m>`` and ``t_<m>`` [B, F], a head each.

    Args (``model.modality_fusion_kwargs``):
        ksize, stride: the offset windows (IDEA: 4, 2: 7x3 points on a 16x8 grid).
        offset_factor: offset range (IDEA: 5 RGBNT201, 21 RGBNT100, 25 MSVR310).
        direct: the branches above.
        text: the T queries and ``LOCAL_t`` (needs ``model.inverted_text``).
        test_feat: the retrieval feature in evaluation (IDEA's eval dict; L2-normalised by the
            evaluator, as their loops do): ``local_t`` (their model selection's, the default),
            ``local_v``, ``local`` (both), ``v``, ``t``, ``globals`` (the 2M globals) or
            ``globals+local``. Use ``eval.feat: pre`` (IDEA has no BNNeck at test time).
    """

    needs_tokens = True
    handles_missing = False

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None,
                 ksize: int = 4, stride: int = 2, offset_factor: float = 5.0, direct: bool = True, text: bool = True,
                 test_feat: str = "local_t") -> None:
        super().__init__(modalities, dim, towers)
        if not self.towers:
            raise ValueError("the cda fusion reads the towers' tokens; build it with towers={name: TowerInfo}")
        bad = [m for m in self.modalities if is_text(m)]
        if bad:
            raise ValueError(f"the cda fusion aggregates image modalities; {bad} has no patch map (leave it out of "
                             "data.modalities)")
        if test_feat not in TEST_FEATS:
            raise ValueError(f"test_feat must be one of {list(TEST_FEATS)}, got {test_feat!r}")
        if test_feat in ("local_t", "t", "local", "globals", "globals+local") and not text:
            raise ValueError(f"test_feat {test_feat!r} needs the text queries (text: true)")
        self.direct, self.text, self.test_feat = direct, text, test_feat
        self.aggregators = nn.ModuleDict({t: DeformableAggregation(len(self.modalities), dim, info.grid, ksize, stride,
                                                                   offset_factor) for t, info in self.towers.items()})

    @property
    def out_dim(self) -> int:
        return self.dim * len(self.modalities)

    @property
    def heads(self) -> Dict[str, int]:
        width = self.dim * len(self.modalities)
        mods = self.modalities
        if self.direct:
            branches = {"v": width, **({"t": width} if self.text else {})}
        else:
            branches = {f"v_{m}": self.dim for m in mods}
            if self.text:
                branches = {**{f"t_{m}": self.dim for m in mods}, **branches}
        return {**branches, "vv": width} if self.text else branches

    def _text(self, inputs, m: str, tower: str) -> torch.Tensor:
        t = inputs[m].projected[tower].text
        if t is None:
            raise ValueError("the cda fusion's text queries need the inverted-text token (model.inverted_text.enabled; "
                             "or modality_fusion_kwargs.text: false)")
        return t

    def forward(self, inputs, parts: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> FusionOutput:
        """``parts`` (a dict) receives each tower's aggregation intermediates, and ``queries`` / ``out``."""
        self.check(inputs)
        mods = self.modalities
        local_v, local_t = [], []
        for t, agg in self.aggregators.items():
            h, w = agg.grid
            maps = [inputs[m].projected[t].patches.transpose(1, 2).reshape(-1, self.dim, h, w) for m in mods]
            queries = [inputs[m].projected[t].cls for m in mods]
            if self.text:
                queries += [self._text(inputs, m, t) for m in mods]
            queries = torch.stack(queries, dim=1)
            p = {} if parts is not None else None
            out = agg(maps, queries, p)
            if parts is not None:
                parts[t] = dict(p, queries=queries, out=out)
            n = len(mods)
            local_v.append(out[:, :n].flatten(1))
            local_t.append(out[:, n:].flatten(1))
        mean = lambda xs: xs[0] if len(xs) == 1 else torch.stack(xs).mean(dim=0)  # noqa: E731
        lv, lt = mean(local_v), mean(local_t) if self.text else None
        v = {m: inputs[m].feat for m in mods}
        tt = {m: mean([self._text(inputs, m, t) for t in self.aggregators]) for m in mods} if self.text else {}
        if self.direct:
            extra = {"v": torch.cat([v[m] for m in mods], dim=1)}
            if self.text:
                extra["t"] = torch.cat([tt[m] for m in mods], dim=1)
        else:
            extra = {**{f"t_{m}": tt[m] for m in tt}, **{f"v_{m}": v[m] for m in mods}}
        if self.text:
            extra["vv"] = lv
        feat = lt if self.text else lv
        test = None
        if not self.training and self.test_feat != ("local_t" if self.text else "local_v"):
            ov = torch.cat([v[m] for m in mods], dim=1)
            ot = torch.cat([tt[m] for m in mods], dim=1) if self.text else None
            test = {"local_v": lambda: lv, "local": lambda: torch.cat([lv, lt], dim=1), "v": lambda: ov,
                    "t": lambda: ot, "globals": lambda: torch.cat([ov, ot], dim=1),
                    "globals+local": lambda: torch.cat([ov, ot, lv, lt], dim=1)}[self.test_feat]()
        return FusionOutput(feat, extra=extra, test_feat=test)


__all__ = ["CaptionTokenizer", "CooperativeDeformableAggregation", "DeformableAggregation", "InverseNet",
           "InvertedText", "PREFIX", "TEMPLATES", "TEST_FEATS", "template_bodies"]
