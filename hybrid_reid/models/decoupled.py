"""MDReID's modality-decoupled learning as a modality fusion (``model.modality_fusion: mdreid``).

Re-implemented from the MDReID paper (NeurIPS 2025, "Modality-Decoupled Learning for Any-to-Any
Multi-Modal Object Re-Identification") and its public code (github stone96123/MDReID, ``MDReID`` in
``modeling/make_model.py``, ``select_feature`` in their test loop); the tests hold it equal to the
authors' code run on tiny random weights (``tests/fixtures/mdreid``).

Every tower gets a second leading token (:class:`~hybrid_reid.models.shared_token.SharedToken`);
each modality's image goes through the shared towers alone (no cross-modal interaction). Per
modality m, in the shared space F: ``sp_m`` = the class token (modality-**specific**, the encoder's
``feat``), ``sh_m`` = the new token (modality-**shared**, the encoder's ``shared``).

* Retrieval feature, for the modalities present (in the model's order):
  ``[sp_m1, sp_m2, .., sh_m1, sh_m2, ..]`` [B, 2 * M' * F], no BNNeck. A missing modality is simply
  not encoded, so a subset's feature is exactly those chunks of the full one.
* Training branches (each a BNNeck + classifier with the ID and triplet losses): ``specific_<m>``
  (``sp_m``, one head per modality) and ``shared`` (the shared tokens of every modality concatenated,
  [B, M * F], its losses x ``shared_weight``, theirs 3). The retrieval feature itself has no head.
  With the ``orthogonality`` and ``discrepancy`` losses (:mod:`hybrid_reid.losses.decoupling`) this
  is MDReID's whole objective.
* Query and gallery of different modality sets (any-to-any retrieval, ``eval.query_modalities`` /
  ``eval.gallery_modalities``) are made comparable by :meth:`pair_features`: ``a2a: matched`` (the
  default) compares the specific tokens of the modalities both sides have, modality with modality,
  and every shared token (the side with fewer repeats its last one); ``a2a: theirs`` is the authors'
  ``select_feature`` as it runs, which matches specific tokens by *position* in the two ID lists
  while the features are always in R, N, T order (their ``transform_index`` never reorders), so
  lists written out of order (NT -> NR, RN -> TN) compare the wrong modalities.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modalities import is_text
from .fusion import MODALITY_FUSIONS, FusionOutput, ModalityFusion, TowerInfo

A2A_MODES = ("matched", "theirs")


@MODALITY_FUSIONS.register("mdreid")
class DecoupledFusion(ModalityFusion):
    """MDReID: the modality-specific and modality-shared tokens of every modality (module docstring).

    Args (``model.modality_fusion_kwargs``):
        tie: the shared token is the class token itself, one parameter (their code); false gives it
            its own parameter (a copy of the class token at the start).
        shared_weight: factor on the ID / triplet losses of the ``shared`` branch (theirs: 3).
        a2a: ``matched`` or ``theirs`` (see :meth:`pair_features`).
    """

    feat_head = False  # the retrieval feature is only the test feature; the branches train

    def __init__(self, modalities: Sequence[str], dim: int, towers: Optional[Dict[str, TowerInfo]] = None,
                 tie: bool = True, shared_weight: float = 3.0, a2a: str = "matched") -> None:
        super().__init__(modalities, dim, towers)
        text = [m for m in self.modalities if is_text(m)]
        if text:
            raise ValueError(f"mdreid reads each image modality's class and shared tokens; {text} has none (leave it "
                             "out of data.modalities or use model.modality_fusion=concat)")
        if a2a not in A2A_MODES:
            raise ValueError(f"a2a must be one of {list(A2A_MODES)}, got {a2a!r}")
        self.tie, self.shared_weight, self.a2a = bool(tie), float(shared_weight), a2a

    @property
    def out_dim(self) -> int:
        return 2 * self.dim * len(self.modalities)

    @property
    def heads(self) -> Dict[str, int]:
        return {**{f"specific_{m}": self.dim for m in self.modalities}, "shared": self.dim * len(self.modalities)}

    @property
    def branch_weights(self) -> Dict[str, float]:
        return {"shared": self.shared_weight}

    def setup_tower(self, backbone: nn.Module) -> None:
        backbone.install_shared_token(self.tie)

    def forward(self, inputs) -> FusionOutput:
        self.check(inputs)
        present = [m for m in self.modalities if m in inputs]
        if any(inputs[m].shared is None for m in present):
            raise ValueError("mdreid needs the towers' shared token (Backbone.install_shared_token); build the model "
                             "with build_model, which installs it")
        sp = [inputs[m].feat for m in present]
        sh = [inputs[m].shared for m in present]
        extra = {f"specific_{m}": inputs[m].feat for m in present}
        if len(present) == len(self.modalities):
            extra["shared"] = torch.cat(sh, dim=1)
        return FusionOutput(torch.cat(sp + sh, dim=1), extra=extra)

    # ---------------------------------------------------------------------------------- any-to-any
    def _chunks(self, feat: torch.Tensor, modalities: Sequence[str]) -> Tuple[Dict[str, torch.Tensor],
                                                                             Dict[str, torch.Tensor]]:
        """A retrieval feature of ``modalities`` -> ``({m: sp_m}, {m: sh_m})``."""
        present = [m for m in self.modalities if m in modalities]
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown or feat.shape[1] != 2 * len(present) * self.dim:
            raise ValueError(f"a feature of width {feat.shape[1]} for modalities {list(modalities)}; mdreid's feature "
                             f"of {len(present)} of its modalities {self.modalities} is {2 * len(present) * self.dim} "
                             "wide")
        parts = feat.split(self.dim, dim=1)
        n = len(present)
        return dict(zip(present, parts[:n])), dict(zip(present, parts[n:]))

    def pair_features(self, qf: torch.Tensor, q_modalities: Sequence[str], gf: torch.Tensor,
                      g_modalities: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query [Nq, 2*|Q|*F] and gallery [Ng, 2*|G|*F] features (modality lists Q and G) -> features of
        one width whose distances are MDReID's any-to-any ones.

        ``matched`` (default): with C the modalities in both lists (the model's order), each side is
        ``[sp_c for c in C] + [sh_c for c in C] + [its other sh]``; the side with fewer shared tokens
        repeats its last one until the widths agree. For the same modality set (any order) that is
        the full feature. ``theirs``: the authors' ``select_feature`` (see the module docstring); a
        pair of lists their code cannot compare is an error.
        """
        q_modalities, g_modalities = list(q_modalities), list(g_modalities)
        if self.a2a == "theirs":
            return self._pair_theirs(qf, q_modalities, gf, g_modalities)
        (q_sp, q_sh), (g_sp, g_sh) = self._chunks(qf, q_modalities), self._chunks(gf, g_modalities)
        if set(q_sp) == set(g_sp):
            return qf, gf
        common = [m for m in self.modalities if m in q_sp and m in g_sp]

        def side(sp: Dict[str, torch.Tensor], sh: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
            return [sp[m] for m in common] + [sh[m] for m in common] + [t for m, t in sh.items() if m not in common]

        q, g = side(q_sp, q_sh), side(g_sp, g_sh)
        q += [q[-1]] * (len(g) - len(q))
        g += [g[-1]] * (len(q) - len(g))
        return torch.cat(q, dim=1), torch.cat(g, dim=1)

    def _pair_theirs(self, qf: torch.Tensor, qm: List[str], gf: torch.Tensor, gm: List[str]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The authors' ``transform_index`` (a no-op) + ``select_feature``, on modality lists."""
        self._chunks(qf, qm), self._chunks(gf, gm)  # checks the widths
        if qm == gm:
            return qf, gf
        nq, ng = len(qm), len(gm)
        if nq != ng and 1 not in (nq, ng):
            raise ValueError(f"a2a: theirs cannot compare {qm} with {gm} (their select_feature compares the ID lists "
                             "element by element, broadcasting only a list of one); use a2a: matched")
        same = [qm[0 if nq == 1 else i] == gm[0 if ng == 1 else i] for i in range(max(nq, ng))]
        common = [i for i, s in enumerate(same) if s]
        if any(i >= nq for i in common):
            raise ValueError(f"a2a: theirs cannot compare {qm} with {gm} (their select_feature indexes past the query "
                             "list); use a2a: matched")
        q_shared, g_shared = qf[:, qf.shape[1] // 2:], gf[:, gf.shape[1] // 2:]
        if common:
            q_parts, g_parts = qf.chunk(2 * nq, dim=1), gf.chunk(2 * ng, dim=1)
            q = torch.cat([q_parts[i] for i in common] + [q_shared], dim=1)
            g = torch.cat([g_parts[i] for i in common] + [g_shared], dim=1)
        else:
            q, g = q_shared, g_shared
        wq, wg = q.shape[1], g.shape[1]
        # pad with the shorter one's own last columns, as their code does (a negative start counts from the end)
        if wq > wg:
            g = torch.cat([g, g[:, wg - (wq - wg):]], dim=1)
        elif wg > wq:
            q = torch.cat([q, q[:, wq - (wg - wq):]], dim=1)
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"a2a: theirs cannot compare {qm} with {gm} (their padding leaves widths {q.shape[1]} and "
                             f"{g.shape[1]}); use a2a: matched")
        return q, g
