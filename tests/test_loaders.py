"""The RGBNT100, MSVR310 and ORBench readers on their synthetic layouts, and their errors."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from hybrid_reid.data import DataError, MultiModalDataset, PairedTransform, SampleKey, SynthSpec, generate
from hybrid_reid.data.datasets import DATASETS, ORBench, open_image

SPEC = SynthSpec(ids=12, cams=3, images_per_cam=2, seed=5, size=(64, 32))
N_TEST, N_TRAIN = SPEC.num_test, SPEC.ids - SPEC.num_test
MODS = ["rgb", "nir", "tir"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for layout in ("rgbnt100", "msvr310", "orbench"):
        root = tmp_path_factory.mktemp(layout)
        generate(str(root), SPEC, layout=layout)
        out[layout] = str(root)
    return out


def fresh_copy(roots, layout, folder, tmp_path):
    shutil.copytree(os.path.join(roots[layout], folder), tmp_path / folder)
    return str(tmp_path)


def test_rgbnt100_splits_one_jpg_into_three_modalities(roots):
    data = DATASETS.get("rgbnt100").load(roots["rgbnt100"], MODS)
    assert data.num_train_pids == N_TRAIN and len(data.train) == N_TRAIN * 3 * 2
    assert len(data.query) == N_TEST * 3 and len(data.gallery) == N_TEST * 3  # first image per camera = query
    assert data.num_cams == 3 and {s.camid for s in data.train} == {0, 1, 2}
    s = data.query[0]
    assert len(set(s.paths.values())) == 1  # one file ...
    whole = np.asarray(open_image(s.paths["rgb"]))
    assert whole.shape == (64, 96, 3)
    parts = [np.asarray(open_image(s.paths[m], s.crops[m])) for m in MODS]  # ... three 32-wide strips
    for i, p in enumerate(parts):
        assert np.array_equal(p, whole[:, 32 * i:32 * (i + 1)])
    assert parts[0].std(-1).mean() > 5 and parts[1].std(-1).mean() < 2  # RGB has colour, NIR is grey
    tf = PairedTransform((64, 32), (0.5,) * 3, (0.5,) * 3, train=False)
    for cache in (False, True):
        item = MultiModalDataset(data.query[:2], MODS, tf, cache=cache)[0]
        assert not torch.equal(item["images"]["rgb"], item["images"]["nir"])
    assert "rgbnt100 loaded" in data.summary_table() and "# tir" in data.summary_table()


def test_rgbnt100_errors_name_what_is_missing(roots, tmp_path):
    with pytest.raises(DataError, match=r"RGBNT100/rgbir/bounding_box_train"):
        DATASETS.get("rgbnt100").load(str(tmp_path), MODS)
    with pytest.raises(DataError, match="has no modality 'sketch'"):
        DATASETS.get("rgbnt100").load(roots["rgbnt100"], ["rgb", "sk"])
    root = fresh_copy(roots, "rgbnt100", "RGBNT100", tmp_path)
    shutil.rmtree(os.path.join(root, "RGBNT100", "rgbir", "query"))
    with pytest.raises(DataError, match="rgbir/query is missing"):
        DATASETS.get("rgbnt100").load(root, MODS)


def test_msvr310_parses_vid_scene_camera(roots, tmp_path):
    data = DATASETS.get("msvr310").load(roots["msvr310"], MODS)
    assert data.protocol == "msvr310" and data.num_train_pids == N_TRAIN
    assert len(data.train) == N_TRAIN * 3 * 2
    assert len(data.query) == N_TEST and len(data.gallery) == N_TEST * (3 * 2 - 1)
    q = data.query[0]
    assert q.camid == 0 and q.sceneid == 1 and os.path.basename(q.paths["rgb"]) == os.path.basename(q.paths["tir"])
    assert q.paths["nir"].endswith(os.path.join("ni", os.path.basename(q.paths["rgb"])))
    # capture k of every camera is scene k+1: some gallery items share the query's scene at another camera
    same_scene = [g for g in data.gallery if g.pid == q.pid and g.sceneid == q.sceneid]
    assert len(same_scene) == 2 and all(g.camid != q.camid for g in same_scene)
    # the lowercase folder works too
    lower = tmp_path / "lower"
    shutil.copytree(os.path.join(roots["msvr310"], "MSVR310"), lower / "msvr310")
    assert len(DATASETS.get("msvr310").load(str(lower), ["rgb"]).train) == len(data.train)
    # a missing partner is named
    os.remove(data.train[0].paths["tir"].replace(roots["msvr310"], str(lower)).replace("MSVR310", "msvr310"))
    with pytest.raises(DataError, match=r"th/.*is missing: .*vis/.* has no partner"):
        DATASETS.get("msvr310").load(str(lower), MODS)


def test_orbench_train_pools_and_query_sets(roots):
    mods = ["rgb", "nir", "cp", "sk", "text"]
    data = ORBench.load(roots["orbench"], mods)
    assert data.modalities == ["rgb", "nir", "cpencil", "sketch", "text"] and data.protocol == "orbench"
    assert data.num_train_pids == N_TRAIN and len(data.train) == N_TRAIN * 6  # one entry per RGB image
    s = data.train[0]
    assert s.text.startswith("a person in a") and set(s.pools) == {"nir", "cpencil", "sketch"}
    assert len(s.pools["sketch"]) == 6 and all(f"{os.sep}sk{os.sep}" in p for p in s.pools["sketch"])
    assert len(data.gallery) == N_TEST * 6 and all(list(g.paths) == ["rgb"] for g in data.gallery)
    assert len(data.query_sets) == 32  # the benchmark's ordered sets: 4 single, 12 pairs, 12 triples, 4 quadruples
    assert [sum(len(k.split("+")) == n for k in data.query_sets) for n in (1, 2, 3, 4)] == [4, 12, 12, 4]
    assert "nir+cpencil" in data.query_sets and "cpencil+nir" in data.query_sets  # two tasks
    q = data.query_sets["nir+cpencil+text"]
    assert len(q) == 2 * N_TEST and q[0].modalities == ["nir", "cpencil", "text"]
    assert {x.pid for x in q} == {g.pid for g in data.gallery}
    # a narrower data.modalities keeps only the sets it can answer
    narrow = ORBench.load(roots["orbench"], ["rgb", "sketch", "text"])
    assert list(narrow.query_sets) == ["sketch", "text", "text+sketch", "sketch+text"]
    table = data.summary_table()
    assert "query nir+cpencil+sketch+text" in table and "# cpencil" in table


def test_orbench_synthetic_set_has_the_benchmarks_structure(roots):
    """What the ReID5o authors' reader requires: training ids 1..N, the 32 ordered keys, and entries
    ``[pid, item per modality in the key's order]``."""
    from hybrid_reid.data.synth import ORBENCH_QUERY_SETS

    base = os.path.join(roots["orbench"], "ORBench")
    with open(os.path.join(base, "train_annos.json")) as f:
        train = json.load(f)
    ids = sorted({a["id"] for a in train})
    assert ids == list(range(1, len(ids) + 1)) and len(ids) == N_TRAIN
    assert all(a["file_path"].split("/")[1] == f"{a['id']:04d}" for a in train)
    with open(os.path.join(base, "test_gallery_and_queries.json")) as f:
        spec = json.load(f)
    assert list(spec) == ["RGB_GALLERY", *ORBENCH_QUERY_SETS] and len(ORBENCH_QUERY_SETS) == 32
    assert min(pid for pid, _ in spec["RGB_GALLERY"]) == N_TRAIN + 1  # test ids follow the training ids
    dirs = {"NIR": "nir/", "CP": "cp/", "SK": "sk/"}
    for key in ORBENCH_QUERY_SETS:
        for entry in spec[key]:
            assert len(entry) == 1 + len(key.split("+")) and isinstance(entry[0], int)
            for m, item in zip(key.split("+"), entry[1:]):
                assert item.startswith(dirs[m]) if m != "TEXT" else item.startswith("a person")


def test_orbench_entries_are_read_by_position(roots, tmp_path):
    root = fresh_copy(roots, "orbench", "ORBench", tmp_path)
    path = os.path.join(root, "ORBench", "test_gallery_and_queries.json")
    with open(path) as f:
        spec = json.load(f)
    good = ORBench.load(root, ["rgb", "nir", "cpencil"])
    a, b = good.query_sets["nir+cpencil"][0], good.query_sets["cpencil+nir"][0]
    assert list(a.paths) == ["nir", "cpencil"] and list(b.paths) == ["cpencil", "nir"]
    for broken, why in (([*spec["NIR"][0], 7], "an extra trailing integer"),
                        ([spec["CP+NIR"][0][0], spec["CP+NIR"][0][2], spec["CP+NIR"][0][1]], "swapped items"),
                        ([str(spec["NIR"][0][0]), spec["NIR"][0][1]], "a pid that is not an integer")):
        key = "CP+NIR" if why == "swapped items" else "NIR"
        spec2 = json.loads(json.dumps(spec))
        spec2[key][0] = broken
        with open(path, "w") as f:
            json.dump(spec2, f)
        with pytest.raises(DataError, match=rf"{re.escape(key)} entry .* does not hold a pid and exactly"):
            ORBench.load(root, ["rgb", "nir", "cpencil"])


def test_orbench_resamples_unpaired_modalities_in_training(roots):
    data = ORBench.load(roots["orbench"], ["rgb", "nir"])
    tf = PairedTransform((64, 32), (0.5,) * 3, (0.5,) * 3, train=False)
    train_ds = MultiModalDataset(data.train[:1], ["rgb", "nir"], tf, resample=True)
    seen = {train_ds[SampleKey(0, 0, pos)]["images"]["nir"].sum().item() for pos in range(30)}
    assert len(seen) > 1  # a different NIR image of the identity at other places of the epoch ...
    again = {train_ds[SampleKey(0, 0, 5)]["images"]["nir"].sum().item() for _ in range(5)}
    assert len(again) == 1  # ... and the same one for the same place
    test_ds = MultiModalDataset(data.train[:1], ["rgb", "nir"], tf)
    assert len({test_ds[0]["images"]["nir"].sum().item() for _ in range(5)}) == 1


def test_orbench_errors(roots, tmp_path):
    with pytest.raises(DataError, match="train_annos.json"):
        ORBench.load(str(tmp_path), ["rgb", "nir"])
    with pytest.raises(DataError, match="include rgb"):
        ORBench.load(roots["orbench"], ["nir", "text"])
    root = fresh_copy(roots, "orbench", "ORBench", tmp_path)
    base = os.path.join(root, "ORBench")
    with open(os.path.join(base, "test_gallery_and_queries.json")) as f:
        spec = json.load(f)
    spec["NIR"][0] = [spec["NIR"][0][0]]  # no image
    with open(os.path.join(base, "test_gallery_and_queries.json"), "w") as f:
        json.dump(spec, f)
    with pytest.raises(DataError, match=r"NIR entry .* does not hold a pid and exactly \['nir'\]"):
        ORBench.load(root, ["rgb", "nir"])
    first_train = json.load(open(os.path.join(base, "train_annos.json")))[0]["file_path"].split("/")[1]
    shutil.rmtree(os.path.join(base, "sk", first_train))
    with pytest.raises(DataError, match=rf"sk{os.sep}{first_train} has no images"):
        ORBench.load(root, ["rgb", "sketch"])
    with open(os.path.join(base, "train_annos.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(DataError, match="train_annos.json is not valid JSON"):
        ORBench.load(root, ["rgb"])
