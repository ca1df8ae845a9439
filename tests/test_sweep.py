"""run.py sweep: variants x seeds as separate runs, skip / resume, results table and chart."""
import csv
import json
import os

import pytest
from conftest import ROOT, run_python

from hybrid_reid.config import ConfigError
from hybrid_reid.sweep import load_suite, results_markdown

TINY_RUN = ["data.synth.ids=16", "data.synth.cams=2", "data.synth.images_per_cam=2", "data.synth.size=[64,32]",
            "data.batch_size=8", "data.num_instances=2", "train.epochs=1", "train.warmup_epochs=0",
            "model.multi_scale.enabled=false"]


def write_suite(tmp_path, data_root):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""description: micro suite
base: {os.path.join(ROOT, "configs", "quickstart.yaml")}
overrides: {json.dumps([f"data.root={data_root}", *TINY_RUN])}
seeds: [0, 1]
output_dir: {tmp_path / "out"}
variants:
  concat: {{model.modality_fusion: concat}}
  mean: [model.modality_fusion=mean]
""")
    return suite


def test_sweep_runs_every_variant_and_seed_skips_and_resumes(tmp_path):
    suite = write_suite(tmp_path, tmp_path / "data")
    r = run_python("run.py", "sweep", str(suite), "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("todo") == 4 and "mean  seed 1" in r.stdout
    r = run_python("run.py", "sweep", str(suite), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(x["variant"], x["seed"]) for x in rows] == [("concat", "0"), ("concat", "1"), ("mean", "0"), ("mean", "1")]
    assert all(0 <= float(x["mAP"]) <= 100 and int(x["params"]) > 0 for x in rows)
    md = (out / "results.md").read_text()
    assert "| concat |" in md and "±" in md and "2 seed(s)" in md
    assert (out / "results.png").stat().st_size > 5000
    # an interrupted sweep: one run lost its metrics.json (killed after its checkpoint) -> only it resumes
    os.remove(out / "mean" / "seed1" / "metrics.json")
    r = run_python("run.py", "sweep", str(suite), "--dry-run")
    assert r.stdout.count("done") == 3 and "resume  mean  seed 1" in r.stdout
    r = run_python("run.py", "sweep", str(suite), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("already finished, skipped") == 3
    again = list(csv.DictReader(open(out / "results.csv")))
    assert again[3]["mAP"] == rows[3]["mAP"]  # the resumed run ends with the same numbers


def test_bad_suites_are_refused_naming_the_variant(tmp_path):
    suite = write_suite(tmp_path, tmp_path / "data")
    text = suite.read_text()
    suite.write_text(text.replace("model.modality_fusion: concat", "model.modality_fusoin: concat"))
    with pytest.raises(ConfigError, match="variant 'concat'.*modality_fusoin"):
        load_suite(str(suite))
    suite.write_text(text + "  extra: 3\n")
    with pytest.raises(ConfigError, match="variants.extra"):
        load_suite(str(suite))
    suite.write_text(text.replace("seeds:", "seedz:"))
    with pytest.raises(ConfigError, match="seedz"):
        load_suite(str(suite))


def test_results_markdown_means_and_stds():
    rows = [{"variant": "a", "seed": s, "mAP": m, "rank1": m, "mINP": m, "params": 2e6, "train_time_s": 10}
            for s, m in ((0, 50.0), (1, 60.0))]
    md = results_markdown(rows, "t")
    assert "| a | 55.00 ± 7.07 |" in md and "2.00 M" in md


def test_a_variant_can_start_from_its_own_config(tmp_path):
    """_base_ in a variant: a method compared on its authors' recipe, with the suite's overrides and seeds."""
    suite = write_suite(tmp_path, tmp_path / "data")
    text = suite.read_text()
    other = tmp_path / "other.yaml"
    other.write_text(f"_base_: {os.path.join(ROOT, 'configs', 'quickstart.yaml')}\nmodel: {{modality_fusion: mean}}\n"
                     "optim: {lr: 0.0123}\n")
    suite.write_text(text + "  own: {_base_: other.yaml, train.epochs: 2}\n")
    _, base, runs = load_suite(str(suite))
    own = [r for r in runs if r.variant == "own"]
    assert [r.seed for r in own] == [0, 1] and all(r.base == str(other) for r in own)
    assert all(r.base == base for r in runs if r.variant != "own")
    from hybrid_reid.config import load_config

    cfg = load_config(own[0].base, own[0].overrides)
    assert cfg.optim.lr == 0.0123 and cfg.model.modality_fusion == "mean" and cfg.train.epochs == 2
    assert cfg.data.root == str(tmp_path / "data") and cfg.seed == 0  # the suite's overrides and seeds apply
    r = run_python("run.py", "sweep", str(suite), "--dry-run", "--verbose")
    assert r.returncode == 0 and f"--config {other}" in r.stdout, r.stdout[-2000:]
    suite.write_text(text + "  own: {_base_: nowhere.yaml}\n")
    with pytest.raises(ConfigError, match="variant 'own'.*nowhere.yaml does not exist"):
        load_suite(str(suite))
