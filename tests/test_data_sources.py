"""Your own data (the folder and manifest sets), MSMT17 and VeRi-776 on their synthetic layouts, and their errors."""
import csv
import json
import os
import re
import shutil

import pytest
from conftest import ROOT, run_python

from hybrid_reid import load_config
from hybrid_reid.config import ConfigError
from hybrid_reid.data import DATASETS, DataError, SynthSpec, generate, load_data
from hybrid_reid.data.custom import FolderSet, ManifestSet
from hybrid_reid.data.datasets import MSMT17, VeRi776

SPEC = SynthSpec(ids=12, cams=3, images_per_cam=2, seed=7, size=(64, 32))
N_TEST, N_TRAIN = SPEC.num_test, SPEC.ids - SPEC.num_test
MODS = ["rgb", "nir", "tir"]
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for layout in ("folder", "manifest", "msmt17", "veri776"):
        root = tmp_path_factory.mktemp(layout)
        generate(str(root), SPEC, layout=layout)
        out[layout] = str(root)
    return out


def copy_of(roots, layout, folder, tmp_path):
    """A private copy of a generated set's folder (to break), as ``tmp_path/<folder>``."""
    shutil.copytree(os.path.join(roots[layout], folder), tmp_path / folder)
    return tmp_path / folder


def check_market_split(data, n_cams=3):
    """The counts every layout written like market1501 has: the first capture of each test identity and
    camera is a query, the rest gallery; training pids relabelled, test pids as written."""
    assert data.num_train_pids == N_TRAIN and len(data.train) == N_TRAIN * 3 * 2
    assert sorted({s.pid for s in data.train}) == list(range(N_TRAIN))
    assert len(data.query) == N_TEST * 3 and len(data.gallery) == N_TEST * 3
    assert {s.pid for s in data.query} == {s.pid for s in data.gallery} and len({s.pid for s in data.query}) == N_TEST
    assert data.num_cams == n_cams and {s.camid for s in data.train + data.query + data.gallery} == set(range(n_cams))
    assert not data.shared_query_gallery and data.protocol == "market"


# ---------------------------------------------------------------------------------------------- folder
def test_folder_reads_modalities_pids_and_cameras(roots):
    root = os.path.join(roots["folder"], "folder")
    data = FolderSet.load(root, MODS)
    check_market_split(data)
    assert data.name == "folder" and data.modalities == MODS
    q = data.query[0]
    assert list(q.paths) == MODS and len({os.path.basename(p) for p in q.paths.values()}) == 1  # paired by stem
    assert q.paths["nir"] == os.path.join(root, "query", "nir", f"{q.pid:04d}", os.path.basename(q.paths["rgb"]))
    # pid = the <pid> folder, camera = c<n> in the file name (default data.camera_pattern) minus the first
    for s in data.query + data.gallery:
        name = os.path.basename(s.paths["rgb"])
        assert int(name[:4]) == s.pid and int(re.search(r"_c(\d)_", name).group(1)) - 1 == s.camid
    assert "folder loaded" in data.summary_table() and "# tir" in data.summary_table()
    # one modality folder is enough; data.name=folder through load_data and the config
    cfg = load_config(TINY, ["data.name=folder", f"data.root={root}", "data.modalities=[tir]"])
    single = load_data(cfg.data)
    assert single.modalities == ["tir"] and len(single.train) == len(data.train)


def test_folder_aliases_stem_pairing_patterns_and_cameras_csv(roots, tmp_path):
    root = copy_of(roots, "folder", "folder", tmp_path)
    for split in ("train", "query", "gallery"):  # folders named by aliases; tir removed
        os.rename(root / split / "rgb", root / split / "vis")
        os.rename(root / split / "nir", root / split / "NI")
        shutil.rmtree(root / split / "tir")
    nir = sorted((root / "train" / "NI").rglob("*.jpg"))[0]
    png = nir.with_suffix(".png")
    os.rename(nir, png)  # another extension, the same stem: still a pair
    data = FolderSet.load(str(root), ["rgb", "ni"])
    assert data.modalities == ["rgb", "nir"] and len(data.train) == N_TRAIN * 6
    assert any(s.paths["nir"] == str(png) for s in data.train)
    with pytest.raises(DataError, match=r"no folder for modality 'tir' \(it has NI/ \(nir\), vis/ \(rgb\)\).*"
                                        r"data.modalities=\[nir,rgb\]"):
        FolderSet.load(str(root), MODS)

    # data.camera_pattern: here the capture index is the "camera"
    by_capture = FolderSet.load(str(root), ["rgb"], camera_pattern=r"_(?P<camera>\d+)$")
    assert by_capture.num_cams == 2
    assert all(s.camid == int(os.path.basename(s.paths["rgb"])[-6:-4]) for s in by_capture.query + by_capture.gallery)

    # cameras.csv: names without a camera, cameras given by one modality's file of each sample
    rows = []
    for split in ("train", "query", "gallery"):
        for d, _, files in os.walk(root / split):
            for f in sorted(files):
                new = f.replace("_c", "_x")
                os.rename(os.path.join(d, f), os.path.join(d, new))
                if os.path.basename(os.path.dirname(d)) == "vis":
                    rows.append([os.path.relpath(os.path.join(d, new), root).replace(os.sep, "/"),
                                 ("door", "hall", "yard")[int(f.split("_c")[1][0]) - 1]])
    with pytest.raises(DataError, match=r"no camera: cameras.csv does not list it and its name does not match"):
        FolderSet.load(str(root), ["rgb", "nir"])
    with open(root / "cameras.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "camera"], *rows])
    data = FolderSet.load(str(root), ["rgb", "nir"])
    assert data.num_cams == 3  # door, hall, yard -> 0, 1, 2
    for s in data.query:
        assert s.camid == ("door", "hall", "yard").index(dict(rows)[os.path.relpath(s.paths["rgb"], root)
                                                                   .replace(os.sep, "/")])
    with open(root / "cameras.csv", "a") as f:
        f.write("train/vis/nowhere.jpg,door\n")
    with pytest.raises(DataError, match=rf"cameras.csv: 1 problem\(s\) on 1 line\(s\).*\n  line {len(rows) + 2}: "
                                        r"train/vis/nowhere.jpg does not exist"):
        FolderSet.load(str(root), ["rgb", "nir"])


def test_folder_errors_name_the_folder_and_the_fix(roots, tmp_path):
    root = copy_of(roots, "folder", "folder", tmp_path)
    with pytest.raises(DataError, match="data.root is not set"):
        FolderSet.load(None, MODS)
    with pytest.raises(DataError, match=r"has no train/, query/, gallery/ folder"):
        FolderSet.load(str(tmp_path), MODS)
    with pytest.raises(DataError, match="captions .* manifest"):
        FolderSet.load(str(root), ["rgb", "text"])

    # an unknown modality folder says how to declare it; declared, it is read
    for split in ("train", "query", "gallery"):
        shutil.copytree(root / split / "nir", root / split / "event")
    with pytest.raises(DataError) as e:
        FolderSet.load(str(root), MODS)
    msg = str(e.value)
    assert "unknown modality folder(s) train/event, query/event, gallery/event" in msg
    assert "modalities: {event: {channels: 3}}" in msg and "data.modality_dirs" in msg
    cfg = load_config(TINY, ["modalities={event: {channels: 1}}", "data.name=folder", f"data.root={root}",
                             "data.modalities=[rgb, event]"])
    assert load_data(cfg.data).modalities == ["rgb", "event"]
    for split in ("train", "query", "gallery"):
        shutil.rmtree(root / split / "event")

    # every unpaired file is listed at once, with where its partner should be
    a = sorted((root / "train" / "nir").rglob("*.jpg"))[3]
    b = sorted((root / "gallery" / "tir").rglob("*.jpg"))[1]
    os.remove(a)
    os.remove(b)
    with pytest.raises(DataError) as e:
        FolderSet.load(str(root), MODS)
    msg = str(e.value)
    assert "2 problem(s); nothing was loaded" in msg
    assert f"train/rgb/{a.parent.name}/{a.name} has no partner in train/nir/{a.parent.name}/" in msg
    assert f"gallery/rgb/{b.parent.name}/{b.name} has no partner in gallery/tir/{b.parent.name}/" in msg
    assert FolderSet.load(str(root), ["rgb"]).num_train_pids == N_TRAIN  # fine without the broken modalities


def test_dataset_specific_keys(roots):
    with pytest.raises(ConfigError, match=r"data.camera_pattern=.* has no named group \(\?P<camera>"):
        load_config(TINY, [r"data.camera_pattern=c(\d+)"])
    with pytest.raises(ConfigError, match="data.camera_pattern=.* is not a regular expression"):
        load_config(TINY, ["data.camera_pattern=c(?P<camera>"])
    cfg = load_config(TINY, ["data.name=folder", f"data.root={roots['folder']}/folder", "data.manifest=m.csv"])
    with pytest.raises(DataError, match="data.manifest='m.csv' is read only by data.name=manifest; folder ignores it"):
        load_data(cfg.data)


# -------------------------------------------------------------------------------------------- manifest
def test_manifest_csv_and_json_lines(roots, tmp_path):
    root = os.path.join(roots["manifest"], "manifest")
    data = ManifestSet.load(root, [*MODS, "text"])
    check_market_split(data)
    assert data.name == "manifest" and data.modalities == [*MODS, "text"]
    q = data.query[0]
    assert q.paths["rgb"] == os.path.join(root, "images", "rgb", f"{q.pid:04d}_c{q.camid + 1}_00.jpg")  # beside it
    assert q.text.startswith("a person in a")
    # JSON lines, given by data.manifest (relative: against data.root); paths relative to the manifest's folder
    other = tmp_path / "lists"
    other.mkdir()
    with open(os.path.join(root, "manifest.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(other / "all.jsonl", "w") as f:
        for r in rows:
            r = dict(r, pid=int(r["pid"]), **{m: f"{root}/{r[m]}" if m == "rgb" else f"../m/{r[m]}" for m in MODS})
            f.write(json.dumps(r) + "\n")
    os.symlink(root, tmp_path / "m")
    same = ManifestSet.load(str(tmp_path), ["rgb", "tir"], manifest="lists/all.jsonl")
    assert [(s.pid, s.camid) for s in same.query] == [(s.pid, s.camid) for s in data.query]
    assert os.path.realpath(same.query[0].paths["tir"]) == os.path.realpath(data.query[0].paths["tir"])
    assert ManifestSet.load(None, ["rgb"], manifest=str(other / "all.jsonl")).num_cams == 3  # no data.root needed
    with pytest.raises(DataError, match="data.manifest='nope.csv': .*nope.csv does not exist .*against data.root"):
        ManifestSet.load(str(tmp_path), ["rgb"], manifest="nope.csv")
    with pytest.raises(DataError, match="has no manifest.csv or manifest.jsonl"):
        ManifestSet.load(str(tmp_path), ["rgb"])


def test_malformed_manifest_lists_every_bad_line_at_once(roots, tmp_path):
    root = copy_of(roots, "manifest", "manifest", tmp_path)
    with open(root / "manifest.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    rows[0] = header + ["depth"]  # line 1: an unknown modality column
    rows[1:] = [r + [""] for r in rows[1:]]
    col = {c: header.index(c) for c in header}
    rows[2][col["split"]] = "tset"                      # line 3
    rows[4][col["pid"]] = "abc"                         # line 5
    rows[6][col["rgb"]] = "images/rgb/missing.jpg"      # line 7
    rows[8][col["camera"]] = ""                         # line 9
    rows[10] = rows[10][:3]                             # line 11: too few values
    rows[12][col["pid"]] = "-4"                         # line 13
    (root / rows[14][col["tir"]]).write_bytes(b"not a jpeg")  # line 15: unreadable
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as e:
        ManifestSet.load(str(root), MODS)
    msg = str(e.value)
    assert msg.startswith(f"{root / 'manifest.csv'}: 8 problem(s) on 8 line(s); nothing was loaded")
    found = [int(n) for n in re.findall(r"^  line (\d+):", msg, re.M)]
    assert found == [1, 3, 5, 7, 9, 11, 13, 15]
    for text in ("line 1: column 'depth' is not a known modality", "modalities: {depth: {channels: 3}}",
                 "line 3: unknown split 'tset' (train, query or gallery)", "line 5: bad pid 'abc': an integer >= 0",
                 "line 7: rgb image images/rgb/missing.jpg: ", "missing.jpg does not exist", "line 9: empty camera",
                 "line 11: 3 values for the header's 8 columns", "line 13: bad pid '-4'",
                 "line 15: tir image images/tir/", "is not a readable image"):
        assert text in msg, text
    # the same through run.py: one error, exit code 2, nothing written
    r = run_python("run.py", "train", "--config", TINY, "data.name=manifest", f"data.root={root}",
                   f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "error: " in r.stderr and "line 15: tir image" in r.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_json_lines_and_missing_columns(tmp_path, roots):
    image = os.path.join(roots["manifest"], "manifest", "images", "rgb", "0001_c1_00.jpg")
    good = {"split": "train", "pid": 1, "camera": "c1", "rgb": image}
    lines = [json.dumps(good), "{not json", json.dumps({k: v for k, v in good.items() if k != "camera"}),
             json.dumps(dict(good, sketchy=image)), "", json.dumps([1, 2]), json.dumps(dict(good, pid=True)),
             json.dumps(dict(good, split="query")), json.dumps(dict(good, split="gallery"))]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        ManifestSet.load(str(tmp_path), ["rgb"], manifest="m.jsonl")
    msg = str(e.value)
    assert [int(n) for n in re.findall(r"^  line (\d+):", msg, re.M)] == [2, 3, 4, 6, 7]
    for text in ("line 2: not valid JSON", "line 3: missing key 'camera'", "line 4: key 'sketchy' is not a known "
                 "modality", "line 6: not a JSON object", "line 7: bad pid True"):
        assert text in msg, text
    (tmp_path / "h.csv").write_text(f"split,pid,rgb\ntrain,1,{image}\n")
    with pytest.raises(DataError, match=r"line 1: missing column 'camera'.*\n.*line 1: no column for modality 'nir'"):
        ManifestSet.load(str(tmp_path), ["rgb", "nir"], manifest="h.csv")
    (tmp_path / "q.csv").write_text(f"split,pid,camera,rgb\ntrain,1,1,{image}\n")
    with pytest.raises(DataError, match=r"no query rows.*\n.*no gallery rows"):
        ManifestSet.load(str(tmp_path), ["rgb"], manifest="q.csv")


# ----------------------------------------------------------------------------------- MSMT17, VeRi-776
def test_msmt17_lists_train_plus_val_and_cameras_from_names(roots, tmp_path):
    data = MSMT17.load(roots["msmt17"], ["rgb"])
    check_market_split(data)
    base = os.path.join(roots["msmt17"], "MSMT17_V1")
    val = open(os.path.join(base, "list_val.txt")).read().split()[0]
    assert os.path.join(base, "train", val) in {s.paths["rgb"] for s in data.train}  # list_val is trained on
    assert len(open(os.path.join(base, "list_val.txt")).readlines()) == N_TRAIN
    assert {s.pid for s in data.query} == set(range(N_TEST))  # test identities numbered from 0, as released
    q = data.query[0]
    assert q.camid == int(os.path.basename(q.paths["rgb"]).split("_")[2]) - 1
    assert load_data(load_config(os.path.join(ROOT, "configs", "msmt17.yaml"),
                                 [f"data.root={roots['msmt17']}"]).data).num_cams == 3
    # MSMT17_V2's folder names
    v2 = tmp_path / "MSMT17_V2"
    shutil.copytree(base, v2)
    os.rename(v2 / "train", v2 / "mask_train_v2")
    os.rename(v2 / "test", v2 / "mask_test_v2")
    assert len(MSMT17.load(str(tmp_path), ["rgb"]).train) == len(data.train)
    # errors: rgb only; every bad list line at once
    with pytest.raises(DataError, match=r"msmt17 has only the rgb modality; set data.modalities=\[rgb\]"):
        MSMT17.load(roots["msmt17"], MODS)
    with pytest.raises(DataError, match="looked for .*MSMT17_V1/list_train.txt"):
        MSMT17.load(str(tmp_path / "nowhere"), ["rgb"])
    lines = (v2 / "list_query.txt").read_text().splitlines()
    lines[1] = lines[1].split()[0]
    lines[4] = "0000/0000_000_01_0303morning_9999_0.jpg 0"
    (v2 / "list_query.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        MSMT17.load(str(tmp_path), ["rgb"])
    assert re.findall(r"^  line (\d+):", str(e.value), re.M) == ["2", "5"]
    assert "9999_0.jpg does not exist" in str(e.value)


def test_veri776_layout(roots, tmp_path):
    data = VeRi776.load(roots["veri776"], ["rgb"])
    check_market_split(data)
    assert data.name == "veri776"
    name = os.path.basename(data.gallery[0].paths["rgb"])
    assert re.fullmatch(r"\d{4}_c\d{3}_\d{8}_0\.jpg", name)
    assert data.gallery[0].camid == int(name[6:9]) - 1 and data.gallery[0].pid == int(name[:4])
    assert load_config(os.path.join(ROOT, "configs", "veri776.yaml")).data.name == "veri776"
    with pytest.raises(DataError, match=r"veri776 has only the rgb modality"):
        VeRi776.load(roots["veri776"], MODS)
    lower = copy_of(roots, "veri776", "VeRi", tmp_path)
    os.rename(lower, tmp_path / "veri")
    assert len(DATASETS.get("veri776").load(str(tmp_path), ["rgb"]).gallery) == len(data.gallery)
    shutil.rmtree(tmp_path / "veri" / "image_query")
    with pytest.raises(DataError, match="image_query is missing; VeRi has image_train, image_query, image_test"):
        VeRi776.load(str(tmp_path), ["rgb"])


# ------------------------------------------------------------------------------ train and evaluate
def tiny_run(name, root, out, *extra):
    """``run.py train`` on configs/tiny.yaml for 2 epochs on a tiny set; returns metrics.json."""
    r = run_python("run.py", "train", "--config", TINY, f"data.name={name}", f"data.root={root}", "data.batch_size=16",
                   "data.num_instances=2", "data.num_workers=0", "data.test_batch_size=32", "train.epochs=2",
                   "train.warmup_epochs=1", "train.log_every=2", "optim.lr=1e-3", "optim.group_lr={}",
                   f"output_dir={out}", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| mAP |" in r.stdout
    return json.loads((out / "metrics.json").read_text())


def test_folder_set_trains_and_evaluates(roots, tmp_path):
    m = tiny_run("folder", os.path.join(roots["folder"], "folder"), tmp_path / "out", "data.modalities=[rgb,nir,tir]")
    assert m["dataset"] == "folder" and m["modalities"] == MODS and 0 < m["mAP"] <= 100
    assert m["num_query"] == N_TEST * 3 and m["num_gallery"] == N_TEST * 3 and m["num_valid_queries"] == N_TEST * 3


def test_manifest_set_from_the_synth_cli_trains_and_evaluates(tmp_path):
    r = run_python("run.py", "synth", "--layout", "manifest", "--out", str(tmp_path / "data"), "--ids", "12",
                   "--cams", "3", "--images-per-cam", "2", "--height", "64", "--width", "32", "--seed", "7")
    assert r.returncode == 0, r.stderr
    root = re.search(r"data.root=(\S+)", r.stdout).group(1)
    assert root == str(tmp_path / "data" / "manifest")
    m = tiny_run("manifest", root, tmp_path / "out", "data.modalities=[rgb,tir,text]")
    assert m["dataset"] == "manifest" and m["modalities"] == ["rgb", "tir", "text"] and 0 < m["mAP"] <= 100
    assert m["num_query"] == N_TEST * 3 and m["num_gallery"] == N_TEST * 3
