"""A run survives faults: non-finite steps, kill -9 and resume, bad or unsafe checkpoints, a busy or
used output folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, run_python
from safetensors.torch import load_file
from test_engine import QUICK, tiny_overrides

from hybrid_reid import load_config
from hybrid_reid.engine import train
from hybrid_reid.engine.state import (
    MANIFEST,
    OutputDirNotEmptyError,
    RunLock,
    RunLockedError,
    _sha256,
    verify_checkpoint,
)
from hybrid_reid.engine.train import ConfigChangedError, TrainingDiverged
from hybrid_reid.models import CheckpointError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
COMPARED = ("mAP", "rank1", "rank5", "rank10", "mINP", "cmc", "epoch", "steps", "skipped_steps", "num_valid_queries")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


# ------------------------------------------------------------------------------ non-finite steps

def test_nan_steps_are_skipped_logged_and_counted(data_root, tmp_path):
    out = tmp_path / "nan2"
    cfg = load_config(QUICK, tiny_overrides(data_root, out, 2) + ["debug.nan_at_steps=[3,8]"])
    metrics = train(cfg)
    skips = [r for r in records(out) if r["kind"] == "skip"]
    assert [(r["step"], r["reason"]) for r in skips] == [(3, "non-finite loss"), (8, "non-finite loss")]
    assert all(r["pids"] and r["pids"] == sorted(set(r["pids"])) for r in skips)  # the batch's identities
    epochs = [r for r in records(out) if r["kind"] == "epoch"]
    assert [r["skipped_steps"] for r in epochs] == [1, 1] and all(r["loss"] == r["loss"] for r in epochs)  # not NaN
    assert metrics["skipped_steps"] == 2 and metrics["steps"] == 12 and metrics["mAP"] > 0
    assert all_finite(out / "model.safetensors")
    # a skipped step changes nothing: the scheduler made 10 steps, not 12
    reset_accelerate()
    clean = train(load_config(QUICK, tiny_overrides(data_root, tmp_path / "clean", 2)))
    assert clean["skipped_steps"] == 0 and clean["mAP"] != metrics["mAP"]


def test_ten_bad_steps_in_a_row_stop_the_run_with_the_last_good_state(data_root, tmp_path):
    out = tmp_path / "diverged"
    cfg = load_config(QUICK, tiny_overrides(data_root, out, 3) + ["debug.nan_at_steps=[3,4,5,6,7,8,9,10,11,12,13]"])
    with pytest.raises(TrainingDiverged, match=r"10 consecutive steps \(3\.\.12\).*max_bad_steps=10") as e:
        train(cfg)
    stopped = out / "checkpoints" / "stopped_step_000012"
    assert str(stopped) in str(e.value)
    manifest = verify_checkpoint(str(stopped))
    assert manifest["progress"]["bad_run"] == 10 and manifest["progress"]["step"] == 12
    assert all_finite(stopped / "model.safetensors")
    skips = [r["step"] for r in records(out) if r["kind"] == "skip"]
    assert skips == list(range(3, 13))
    # the state kept is the one after step 2: epoch 1's checkpoint (6 steps) is the only epoch one
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch_001", "stopped_step_000012"]
    a, b = load_file(str(out / "checkpoints" / "epoch_001" / "model.safetensors")), load_file(
        str(stopped / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 7..12 were all skipped
    reset_accelerate()  # a fresh count after a good step: 9 bad steps in a row do not stop a run
    ok = train(load_config(QUICK, tiny_overrides(data_root, tmp_path / "nine", 2)
                           + ["debug.nan_at_steps=[2,3,4,5,6,7,8,9,10]"]))
    assert ok["skipped_steps"] == 9


# --------------------------------------------------------------------------------- kill and resume

def _launch(out, data_root, epochs, *extra):
    args = [sys.executable, "run.py", "train", "--config", QUICK, *tiny_overrides(data_root, out, epochs), *extra]
    return subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, proc, timeout=600):
    """Wait for an event the run signals (a file it writes), or fail if the run ends first."""
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("the run never reached the pause point")
        time.sleep(0.05)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(data_root, tmp_path):
    full = tmp_path / "full"
    uninterrupted = train(load_config(QUICK, tiny_overrides(data_root, full, 4)))

    out = tmp_path / "killed"
    # the run stops itself after step 9 (in epoch 2, after epoch 1's checkpoint) and waits there: the kill
    # lands at that exact point, however fast or slow the machine
    proc = _launch(out, data_root, 4, "debug.pause_after_step=9")
    _wait_for(lambda: (out / ".paused").exists(), proc)
    assert (out / ".paused").read_text().strip() == "9"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = out / "checkpoints"
    assert not (out / "metrics.json").exists()
    assert [n for n in os.listdir(ckpts) if not n.startswith(".")] == ["epoch_001"]
    verify_checkpoint(str(ckpts / "epoch_001"))  # only complete checkpoints carry a real name
    os.remove(out / ".paused")

    with pytest.raises(OutputDirNotEmptyError, match="pass --resume"):  # no silent overwrite
        train(load_config(QUICK, tiny_overrides(data_root, out, 4)))
    reset_accelerate()
    resumed = train(load_config(QUICK, tiny_overrides(data_root, out, 4)), resume="latest")
    for key in COMPARED:
        assert resumed[key] == uninterrupted[key], key
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in records(out) if r["kind"] == "epoch"] == [1, 2, 3, 4]
    assert not any(n.startswith(".") for n in os.listdir(ckpts))  # leftovers of the kill cleaned up


def test_resume_with_a_changed_config_refuses_naming_the_keys(data_root, tmp_path):
    out = tmp_path / "run"
    train(load_config(QUICK, tiny_overrides(data_root, out, 1)))
    reset_accelerate()
    changed = tiny_overrides(data_root, out, 2) + ["optim.lr=0.5", "model.fusion=sum"]
    with pytest.raises(ConfigChangedError) as e:
        train(load_config(QUICK, changed), resume="latest")
    msg = str(e.value)
    assert "optim.lr (0.002 -> 0.5)" in msg and "train.epochs (1 -> 2)" in msg and "model.fusion ('concat' -> 'sum')" \
        in msg and "--allow-config-change" in msg
    assert "data.num_workers" not in msg
    reset_accelerate()  # settings that cannot change the result are allowed
    same = train(load_config(QUICK, tiny_overrides(data_root, out, 1) + ["data.num_workers=1", "train.eval_every=1",
                                                                          "train.log_every=5"]), resume="latest")
    assert same["epoch"] == 1
    reset_accelerate()  # and with --allow-config-change the run goes on with the new values
    r = run_python("run.py", "train", "--config", QUICK, *tiny_overrides(data_root, out, 2), "optim.lr=0.5",
                   "--resume", "--allow-config-change")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming with a changed config: optim.lr (0.002 -> 0.5)" in r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5
    r = run_python("run.py", "train", "--config", QUICK, *tiny_overrides(data_root, out, 3), "--resume")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --resume: the config differs")


def test_truncated_checkpoint_is_reported_and_resume_falls_back(data_root, tmp_path, caplog):
    full = tmp_path / "full"
    uninterrupted = train(load_config(QUICK, tiny_overrides(data_root, full, 3)))
    out = tmp_path / "damaged"
    (out / "checkpoints").mkdir(parents=True)
    for e in ("epoch_001", "epoch_002"):
        shutil.copytree(full / "checkpoints" / e, out / "checkpoints" / e)
    shutil.copytree(full / "checkpoints" / "epoch_002", out / "checkpoints" / ".tmp-epoch_003")  # a killed save
    victim = out / "checkpoints" / "epoch_002" / "optimizer.bin"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="optimizer.bin: truncated or altered"):
        verify_checkpoint(str(out / "checkpoints" / "epoch_002"))
    reset_accelerate()
    with caplog.at_level("WARNING"):
        resumed = train(load_config(QUICK, tiny_overrides(data_root, out, 3)), resume="latest")
    assert any("epoch_002" in r.message and "optimizer.bin" in r.message and "falling back to" in r.message
               and "epoch_001" in r.message for r in caplog.records)
    for key in COMPARED:
        assert resumed[key] == uninterrupted[key], key
    # an explicitly named bad checkpoint is an error, not a fallback
    reset_accelerate()
    bad = out / "checkpoints" / "epoch_003"
    (bad / "random_states_0.pkl").write_bytes(b"\0" * (bad / "random_states_0.pkl").stat().st_size)
    with pytest.raises(CheckpointError, match="random_states_0.pkl: corrupted"):
        train(load_config(QUICK, tiny_overrides(data_root, out, 3)), resume=str(bad))


def test_a_second_run_on_a_busy_output_dir_refuses(data_root, tmp_path):
    out = tmp_path / "busy"
    with RunLock(str(out)):  # as a run in another process would hold it
        with pytest.raises(RunLockedError, match=r"in use by another run \(pid \d+"):
            train(load_config(QUICK, tiny_overrides(data_root, out, 1)), resume="latest")
        with pytest.raises(RunLockedError):
            RunLock(str(out)).acquire()
    reset_accelerate()  # released: an empty folder (the lock file aside) is a fresh start
    assert train(load_config(QUICK, tiny_overrides(data_root, out, 1)))["epoch"] == 1


# ------------------------------------------------------------------------------------ trusted loading

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickles_are_refused_as_pretrained_and_as_resume_checkpoints(data_root, tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state": _Payload(marker)}, evil)

    # as a pretrained tower
    cfg = load_config(QUICK, tiny_overrides(data_root, tmp_path / "a", 1) + [f"model.vit.pretrained={evil}"])
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil.pt: it is a pickle that is not weights-only"):
        train(cfg)
    # as --resume PATH (a file, not a checkpoint folder)
    reset_accelerate()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        train(load_config(QUICK, tiny_overrides(data_root, tmp_path / "b", 1)), resume=str(evil))

    # inside a checkpoint folder, with a manifest forged to match it
    reset_accelerate()
    good = tmp_path / "good"
    train(load_config(QUICK, tiny_overrides(data_root, good, 1)))
    ckpt = tmp_path / "forged" / "checkpoints" / "epoch_001"
    shutil.copytree(good / "checkpoints" / "epoch_001", ckpt)
    shutil.copy(evil, ckpt / "optimizer.bin")
    with pytest.raises(CheckpointError, match="optimizer.bin: truncated or altered"):  # the manifest catches the swap
        verify_checkpoint(str(ckpt))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["optimizer.bin"] = {"size": evil.stat().st_size, "sha256": _sha256(str(ckpt / "optimizer.bin"))}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    forged_cfg = load_config(QUICK, tiny_overrides(data_root, tmp_path / "forged", 1))
    reset_accelerate()
    with pytest.raises(CheckpointError, match=r"refusing to load .*optimizer.bin.*nothing in it was executed"):
        train(forged_cfg, resume=str(ckpt))
    reset_accelerate()  # --resume (latest): reported, skipped, and no other checkpoint to fall back to
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
        train(forged_cfg, resume="latest")
    assert any("refusing to load" in r.message and "optimizer.bin" in r.message for r in caplog.records)
    # accelerate would unpickle a custom_checkpoint_N.pkl without weights_only: it is never accepted
    os.remove(ckpt / "optimizer.bin")
    shutil.copy(good / "checkpoints" / "epoch_001" / "optimizer.bin", ckpt / "optimizer.bin")
    (ckpt / MANIFEST).write_text((good / "checkpoints" / "epoch_001" / MANIFEST).read_text())
    shutil.copy(evil, ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match=r"files not in the manifest: \['custom_checkpoint_0.pkl'\]"):
        verify_checkpoint(str(ckpt))
    # and as a model to evaluate
    from hybrid_reid.models.checkpoint import read_state_dict
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_state_dict(evil)
    assert not marker.exists()


def test_convert_weights_turns_openai_torchscript_into_safetensors(clip_torchscript, clip_ckpt, tmp_path):
    from hybrid_reid.cli import main
    from hybrid_reid.models import create_backbone

    out = tmp_path / "ViT-B-16.safetensors"
    assert main(["convert-weights", clip_torchscript, str(out)]) == 0
    converted = load_file(str(out))
    assert any(k.startswith("visual.") for k in converted)
    kw = dict(arch="ViT-B-16-quickgelu", img_size=(256, 128), width=64, layers=2, heads=2, out_dim=32)
    a = create_backbone("clip", pretrained=str(out), **kw).eval()
    b = create_backbone("clip", pretrained=clip_torchscript, **kw).eval()
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(a.embed(x), b.embed(x))
    assert main(["convert-weights", clip_torchscript, str(tmp_path / "x.pt")]) == 2  # safetensors only
