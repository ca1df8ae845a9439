"""A result is a function of the config and the seed: worker count, process count and compilation
change nothing; the training forward has no graph breaks and no host syncs."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_engine import QUICK, tiny_overrides

from hybrid_reid import build_model, load_config
from hybrid_reid.engine import train
from hybrid_reid.models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

MODS = ["rgb", "nir", "tir"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_zero_and_two_workers_train_identical_weights(data_root, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    runs = {}
    for workers in (0, 2):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        out = tmp_path / f"w{workers}"
        cfg = load_config(QUICK, tiny_overrides(data_root, out, 2) + [f"data.num_workers={workers}",
                                                                      "data.cache_images=false"])
        runs[workers] = (train(cfg), load_file(str(out / "model.safetensors")))
    (m0, w0), (m2, w2) = runs[0], runs[2]
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
    for key in ("mAP", "rank1", "mINP", "cmc"):
        assert m0[key] == m2[key], key


# ------------------------------------------------------------------------------------- global BatchNorm

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_worker(rank, world, port, x, weight, bias, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(x.shape[1]))
    with torch.no_grad():
        bn[0].weight.copy_(weight)
        bn[0].bias.copy_(bias)
    assert convert_sync_batchnorm(bn) == 1 and isinstance(bn[0], GlobalBatchNorm)
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(1, y.numel() + 1, dtype=y.dtype).view_as(y)).sum().backward()
    torch.save({"y": y.detach(), "grad": part.grad, "wgrad": bn[0].weight.grad, "bgrad": bn[0].bias.grad,
                "mean": bn[0].running_mean, "var": bn[0].running_var}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_global_batchnorm_over_two_processes_equals_batchnorm_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g) * 3 + 1
    weight, bias = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    mp.spawn(_bn_worker, args=(2, _free_port(), x, weight, bias, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    # the same upstream gradient as the two halves used (each rank weighted its rows 1..n)
    w = torch.cat([torch.arange(1, 21, dtype=y.dtype).view(4, 5)] * 2)
    (y * w).sum().backward()
    assert torch.allclose(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([p["grad"] for p in parts]), xr.grad, atol=1e-4)
    for p in parts:
        assert torch.allclose(p["mean"], ref.running_mean, atol=1e-6)
        assert torch.allclose(p["var"], ref.running_var, atol=1e-5)
        # the affine parameters' gradients are the per-rank shares; DDP averages them (x R = the total)
    assert torch.allclose(sum(p["wgrad"] for p in parts), ref.weight.grad, atol=1e-4)
    assert torch.allclose(sum(p["bgrad"] for p in parts), ref.bias.grad, atol=1e-4)
    one = GlobalBatchNorm(5)  # one process: plain BatchNorm
    with torch.no_grad():
        one.weight.copy_(weight)
        one.bias.copy_(bias)
    assert torch.allclose(one(x), y, atol=1e-6)


# ------------------------------------------------------------------------------------ compile-clean step

@pytest.mark.parametrize("backbone,extra", [
    ("clip", []), ("vit", []), ("hybrid", []),
    ("hybrid", ["model.mer.enabled=true", "model.tokenizers.enabled=true"]),
])
def test_training_forward_has_no_graph_breaks(backbone, extra):
    import torch._dynamo

    torch._dynamo.reset()
    cfg = load_config("configs/quickstart.yaml", [f"model.backbone={backbone}", "model.num_classes=5",
                                                  "model.multi_scale.enabled=true", *extra])
    model = build_model(cfg.model, modalities=MODS).train()
    images = {m: torch.randn(4, 3, 64, 32) for m in MODS}
    cams = torch.tensor([0, 1, 2, 3])
    explained = torch._dynamo.explain(model)(images, cams)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_forward_equals_eager():
    torch.manual_seed(0)
    cfg = load_config("configs/quickstart.yaml", ["model.num_classes=5", "model.mer.enabled=true"])
    model = build_model(cfg.model, modalities=MODS).eval()
    images = {m: torch.randn(2, 3, 64, 32) for m in MODS}
    cams = torch.tensor([0, 3])
    with torch.no_grad():
        eager = model(images, cams)
        compiled = torch.compile(model, backend="eager")(images, cams)
    assert torch.allclose(compiled.bn_feat, eager.bn_feat, atol=1e-6)
    with pytest.raises(ValueError, match="cam id 9 out of range"):  # eager on CPU: the exact check stays
        model(images, torch.tensor([0, 9]))


def test_deterministic_switch_sets_the_torch_flags():
    from hybrid_reid.engine.train import apply_determinism

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_two_processes_take_the_one_process_first_step(data_root, tmp_path):
    """Same global batch, same augmentation, global BatchNorm, gathered triplet mining: the gradients
    two processes all-reduce are the one-process gradients, up to float summation order."""
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = os.path.join("tests", "scripts", "first_step_grads.py")
    for cmd in ([sys.executable, script, str(tmp_path / "one.pt"), data_root],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                 str(tmp_path / "two.pt"), data_root]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two) and len(one) > 50
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert worst < 1e-6 * max(1.0, scale), (worst, scale)


def test_shards_give_one_two_and_four_processes_the_same_bits(data_root, tmp_path):
    """``train.shards=4``: one process running the four shards in turn, two running two each and four
    running one each end with bitwise identical weights (BatchNorm's running statistics included)
    and metrics; drop path on, so each shard's random stream is exercised."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # the same threads per process
    runs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "run.py",
               "train", "--config", QUICK, *tiny_overrides(data_root, out, 2), "train.shards=4",
               "model.vit.drop_path=0.1"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"train.shards=4: every global batch is 4 independent shards of 4 samples ({4 // n} per process)" \
            in r.stderr
        runs[n] = (json.loads((out / "metrics.json").read_text()), load_file(str(out / "model.safetensors")))
    m1, w1 = runs[1]
    assert any(k.endswith("running_mean") for k in w1) and any(k.endswith("num_batches_tracked") for k in w1)
    for n in (2, 4):
        m, w = runs[n]
        assert m["num_processes"] == n and m["steps"] == m1["steps"] == 2 * 6
        assert set(w) == set(w1) and all(torch.equal(w[k], w1[k]) for k in w1), n
        for key in ("mAP", "rank1", "mINP", "cmc"):
            assert m[key] == m1[key], (n, key)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_shards_settings_that_contradict_are_refused(data_root, tmp_path):
    from hybrid_reid.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="train.shards=2 with train.grad_accum=2"):
        load_config(QUICK, tiny_overrides(data_root, tmp_path / "a", 1) + ["train.shards=2", "train.grad_accum=2"])
    with pytest.raises(ValueError, match="model.sync_bn=true contradicts train.shards=2"):
        train(load_config(QUICK, tiny_overrides(data_root, tmp_path / "b", 1) + ["train.shards=2",
                                                                                 "model.sync_bn=true"]))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="over train.shards=3"):
        train(load_config(QUICK, tiny_overrides(data_root, tmp_path / "c", 1) + ["train.shards=3"]))
