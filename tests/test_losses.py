"""Named losses: ID cross-entropy with label smoothing, batch-hard triplet, the criterion dict."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hybrid_reid.losses import LOSSES, build_criterion


def out(feat=None, logits=None):
    return SimpleNamespace(feat=feat, logits=logits)


def test_id_loss_is_label_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, pids = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    eps = 0.1
    target = torch.full((6, 5), eps / 5).scatter_(1, pids[:, None], 1 - eps + eps / 5)  # the peers' formula
    manual = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert LOSSES.get("id")(eps)(out(logits=logits), pids).item() == pytest.approx(manual.item(), rel=1e-6)


def test_batch_hard_triplet_matches_a_loop():
    torch.manual_seed(0)
    feat, pids = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    d = torch.cdist(feat, feat)
    ap = torch.stack([d[i][pids == pids[i]].max() for i in range(8)])
    an = torch.stack([d[i][pids != pids[i]].min() for i in range(8)])
    soft = LOSSES.get("triplet")()(out(feat=feat), pids)
    hard = LOSSES.get("triplet")(margin=0.3)(out(feat=feat), pids)
    assert soft.item() == pytest.approx(F.softplus(ap - an).mean().item(), rel=1e-5)
    assert hard.item() == pytest.approx(F.relu(ap - an + 0.3).mean().item(), rel=1e-5)


def test_criterion_returns_weighted_named_losses():
    torch.manual_seed(0)
    feat = torch.randn(4, 8, requires_grad=True)
    logits = feat @ torch.randn(8, 3)
    pids = torch.tensor([0, 0, 1, 2])
    crit = build_criterion({"id": {"weight": 1.0, "label_smoothing": 0.0}, "triplet": {"weight": 0.5}})
    losses = crit(out(feat, logits), pids)
    assert set(losses) == {"id", "triplet", "total"}
    assert losses["id"].item() == pytest.approx(F.cross_entropy(logits, pids).item(), rel=1e-6)
    assert losses["triplet"].item() == pytest.approx(0.5 * LOSSES.get("triplet")()(out(feat), pids).item(), rel=1e-6)
    assert losses["total"].item() == pytest.approx(losses["id"].item() + losses["triplet"].item(), rel=1e-6)
    losses["total"].backward()
    assert feat.grad.abs().sum() > 0
    assert set(build_criterion({"id": {"weight": 1.0}, "triplet": {"weight": 0}})(out(feat, logits), pids)) == \
        {"id", "total"}  # weight 0 skips a loss


def test_criterion_errors_name_the_key():
    with pytest.raises(ValueError, match="loss.tripplet: unknown loss 'tripplet'.*Did you mean 'triplet'"):
        build_criterion({"tripplet": {"weight": 1.0}})
    with pytest.raises(ValueError, match="loss.triplet: unknown argument 'margn'"):
        build_criterion({"triplet": {"weight": 1.0, "margn": 0.3}})
    with pytest.raises(ValueError, match="every loss has weight 0"):
        build_criterion({"id": {"weight": 0}})


GATHER_SCRIPT = '''
import torch, torch.distributed as dist
from types import SimpleNamespace
from hybrid_reid.losses import LOSSES
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
full, pids = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
ref_feat = full.clone().requires_grad_()
ref = LOSSES.get("triplet")()(SimpleNamespace(feat=ref_feat), pids)
ref.backward()
local = full[r * 4:(r + 1) * 4].clone().requires_grad_()
loss = LOSSES.get("triplet")()(SimpleNamespace(feat=local), pids[r * 4:(r + 1) * 4])
loss.backward()
assert torch.allclose(loss, ref), (loss, ref)
# DDP averages gradients over ranks: each rank's gradient / w is its slice of the one-process gradient
assert torch.allclose(local.grad / w, ref_feat.grad[r * 4:(r + 1) * 4], atol=1e-6)
'''


def test_triplet_over_two_processes_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
