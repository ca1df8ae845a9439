"""``pip install .`` (a wheel, not editable) gives a ``hybrid-reid`` command and the shipped configs,
usable from an empty directory."""
import os
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with this checkout installed from its wheel; the dependencies (torch ...) come
    from the test environment through a .pth file, so nothing is downloaded."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    tmp = tmp_path_factory.mktemp("pkg")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT,
                        "-w", str(tmp / "wheel")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = os.listdir(tmp / "wheel")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "deps.pth"), "w") as f:  # appended after the venv's own site-packages
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                        "--no-index", str(tmp / "wheel" / wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    empty = tmp / "empty"
    empty.mkdir()
    return venv, empty


def run_in(venv, cwd, *args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    venv, empty = installed
    r = run_in(venv, empty, str(venv / "bin" / "python"), "-c", "import hybrid_reid; print(hybrid_reid.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(str(venv)) and ROOT not in r.stdout


def test_hybrid_reid_command_trains_the_quickstart_by_name_from_an_empty_directory(installed):
    venv, empty = installed
    r = run_in(venv, empty, "hybrid-reid", "info", "--config", "methods/mambapro")
    assert r.returncode == 0 and "modality_fusion: mamba" in r.stdout, r.stderr[-2000:]
    r = run_in(venv, empty, "hybrid-reid", "train", "--config", "quickstart", "train.epochs=1",
               "data.synth.ids=12", "data.synth.cams=2", "data.synth.images_per_cam=2", "data.batch_size=8",
               "data.num_instances=2", "output_dir=out")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(n for n in os.listdir(empty / "out") if not n.startswith(".") and os.path.isfile(empty / "out" / n))
    assert files == ["README.md", "config.yaml", "log.csv", "log.jsonl", "metrics.json", "model.safetensors"]
