"""Synthetic data, the RGBNT201 reader and its errors, the PK sampler, paired transforms."""
import os
import shutil

import numpy as np
import pytest
import torch

from hybrid_reid.data import (
    DataError,
    MultiModalDataset,
    PairedTransform,
    PKSampler,
    SampleRNG,
    SynthSpec,
    canonical_modality,
    generate,
)
from hybrid_reid.data.datasets import RGBNT201, Synthetic

SPEC = SynthSpec(ids=12, cams=3, images_per_cam=2, seed=3, size=(64, 32))
MODS = ["rgb", "nir", "tir"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), SPEC)
    return str(root)


def copy_set(src_root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(os.path.join(src_root, "RGBNT201"), dst / "RGBNT201")
    return dst


def test_synthetic_layout_and_labels(synth_root):
    data = RGBNT201.load(synth_root, MODS)
    assert data.num_cams == 3 and data.modalities == MODS
    assert len(data.train) + len(data.query) == 12 * 3 * 2
    assert data.query is data.gallery  # RGBNT201: query = gallery = test
    assert sorted({s.pid for s in data.train}) == list(range(data.num_train_pids))  # relabelled
    test_pids = {s.pid for s in data.query}
    assert len(test_pids) == SPEC.num_test and min(test_pids) >= 1  # original (1-based) pids
    s = data.query[0]
    name = os.path.basename(s.paths["rgb"])
    assert s.paths["nir"].endswith(os.path.join("NI", name)) and s.paths["tir"].endswith(os.path.join("TI", name))
    assert RGBNT201.parse_name(name) == (s.pid, s.camid)
    assert RGBNT201.parse_name("000123_cam4_0_00.jpg") == (123, 3)


def test_synthetic_is_deterministic_and_modalities_differ(synth_root, tmp_path):
    generate(str(tmp_path), SPEC)
    name = sorted(os.listdir(os.path.join(synth_root, "RGBNT201", "test", "RGB")))[0]
    for d in ("RGB", "NI", "TI"):
        a = open(os.path.join(synth_root, "RGBNT201", "test", d, name), "rb").read()
        b = open(os.path.join(tmp_path, "RGBNT201", "test", d, name), "rb").read()
        assert a == b
    from PIL import Image
    imgs = [np.asarray(Image.open(os.path.join(synth_root, "RGBNT201", "test", d, name)), np.float32)
            for d in ("RGB", "NI", "TI")]
    assert all(np.abs(x - y).mean() > 10 for x, y in [(imgs[0], imgs[1]), (imgs[1], imgs[2])])
    with pytest.raises(FileExistsError, match="--force"):
        generate(str(tmp_path), SPEC)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # nothing half-written left


def test_synthetic_cache_is_reused_and_regenerated_on_new_parameters(tmp_path):
    class Cfg:
        root, modalities = str(tmp_path), ["rgb", "ni"]  # aliases accepted
        synth = SynthSpec(ids=8, cams=2, images_per_cam=2, size=(32, 16))

    data = Synthetic.from_config(Cfg)
    assert data.modalities == ["rgb", "nir"] and len(data.train) + len(data.query) == 32
    stamp = os.path.getmtime(os.path.join(tmp_path, "RGBNT201", "synth.json"))
    Synthetic.from_config(Cfg)
    assert os.path.getmtime(os.path.join(tmp_path, "RGBNT201", "synth.json")) == stamp
    Cfg.synth = SynthSpec(ids=10, cams=2, images_per_cam=2, size=(32, 16))
    regenerated = Synthetic.from_config(Cfg)
    assert len({s.pid for s in regenerated.train}) + len({s.pid for s in regenerated.query}) == 10
    with open(os.path.join(tmp_path, "RGBNT201", "synth.json")) as f:
        assert '"ids": 10' in f.read()


def test_missing_root_and_unknown_modality(tmp_path, synth_root):
    with pytest.raises(DataError, match="has no RGBNT201/ folder"):
        RGBNT201.load(str(tmp_path), MODS)
    with pytest.raises(DataError, match="has no modality 'sketch'"):
        RGBNT201.load(synth_root, ["rgb", "sketch"])
    with pytest.raises(ValueError, match="unknown modality 'depth'"):
        canonical_modality("depth")


def test_missing_modality_folder(synth_root, tmp_path):
    root = copy_set(synth_root, tmp_path)
    shutil.rmtree(root / "RGBNT201" / "test" / "TI")
    with pytest.raises(DataError, match=r"test/TI is missing \(needed for modality 'tir'\)"):
        RGBNT201.load(str(root), MODS)
    RGBNT201.load(str(root), ["rgb", "nir"])  # fine without the thermal modality


def test_unpaired_file_is_named(synth_root, tmp_path):
    root = copy_set(synth_root, tmp_path)
    ni = root / "RGBNT201" / "train_171" / "NI"
    victim = sorted(os.listdir(ni))[5]
    os.remove(ni / victim)
    with pytest.raises(DataError) as e:
        RGBNT201.load(str(root), MODS)
    msg = str(e.value)
    assert f"NI/{victim} is missing" in msg and f"RGB/{victim} has no partner" in msg


def test_empty_split(synth_root, tmp_path):
    root = copy_set(synth_root, tmp_path)
    for d in ("RGB", "NI", "TI"):
        for f in os.listdir(root / "RGBNT201" / "test" / d):
            os.remove(root / "RGBNT201" / "test" / d / f)
    with pytest.raises(DataError, match="'test' split is empty"):
        RGBNT201.load(str(root), MODS)


def test_unreadable_image(synth_root, tmp_path):
    root = copy_set(synth_root, tmp_path)
    tir = root / "RGBNT201" / "test" / "TI"
    victim = sorted(os.listdir(tir))[2]
    (tir / victim).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"unreadable image .*TI/{victim}"):
        RGBNT201.load(str(root), MODS)


def test_pk_sampler_batches_and_rank_split():
    pids = np.repeat(np.arange(10), [2, 3, 4, 5, 6, 2, 3, 4, 5, 6])  # 40 samples
    one = PKSampler(pids, batch_size=8, num_instances=2, seed=1)
    keys = list(one)
    batches = [[k.index for k in b] for b in keys]
    # every key carries the epoch and the sample's place in the epoch's global batch order
    assert [k.position for b in keys for k in b] == list(range(40)) and {k.epoch for b in keys for k in b} == {0}
    assert len(batches) == len(one) == 5
    for b in batches:
        assert len(b) == 8
        ids = pids[b]
        assert len(set(ids)) == 4 and all((ids == p).sum() == 2 for p in set(ids))
    seen = {i for b in batches for i in b}
    assert len(seen) >= 30  # images of an identity are drawn without replacement before repeating
    assert keys == list(PKSampler(pids, 8, 2, seed=1))  # deterministic
    one.set_epoch(1)
    assert [[k.index for k in b] for b in one] != batches and next(iter(one))[0].epoch == 1
    one.set_epoch(0)
    ranks = [list(PKSampler(pids, 8, 2, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    for step, b in enumerate(keys):  # the two ranks split every global batch by identity, keys unchanged
        r0, r1 = ranks[0][step], ranks[1][step]
        i0, i1 = [k.index for k in r0], [k.index for k in r1]
        assert len(r0) == len(r1) == 4 and not set(pids[i0]) & set(pids[i1])
        assert sorted(r0 + r1) == sorted(b)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        PKSampler(pids, 8, 2, num_replicas=3)


def test_pk_sampler_shards_are_the_ranks_batches_whatever_the_process_count():
    pids = np.repeat(np.arange(10), [2, 3, 4, 5, 6, 2, 3, 4, 5, 6])
    ranks = [list(PKSampler(pids, 8, 2, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    one = PKSampler(pids, 8, 2, seed=1, shards=2)  # one process runs both shards, one after the other
    assert len(one) == 10 and list(one)[0::2] == ranks[0] and list(one)[1::2] == ranks[1]
    assert list(PKSampler(pids, 8, 2, seed=1, num_replicas=2, rank=1, shards=2)) == ranks[1]
    four = [list(PKSampler(pids, 8, 2, seed=1, num_replicas=2, rank=r, shards=4)) for r in range(2)]
    alone = list(PKSampler(pids, 8, 2, seed=1, shards=4))
    for step in range(5):  # rank r runs shards 2r and 2r+1 of every step; one process runs all four in order
        assert alone[4 * step:4 * step + 4] == four[0][2 * step:2 * step + 2] + four[1][2 * step:2 * step + 2]
        assert all(len(b) == 2 for b in alone[4 * step:4 * step + 4])
    with pytest.raises(ValueError, match="train.shards=4 cannot be split evenly over 3 processes"):
        PKSampler(pids, 8, 2, num_replicas=3, shards=4)
    with pytest.raises(ValueError, match="over train.shards=3"):
        PKSampler(pids, 8, 2, shards=3)
    with pytest.raises(ValueError, match="only 10"):
        PKSampler(pids, 24, 2)
    with pytest.raises(ValueError, match="multiple of data.num_instances"):
        PKSampler(pids, 9, 2)


def test_paired_transform_shares_geometry_across_modalities():
    tf = PairedTransform((16, 8), (0.5,) * 3, (0.5,) * 3, train=True, flip_prob=1.0, pad=2, erasing_prob=0.0)
    img = torch.randint(0, 255, (3, 16, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outs = []
    for pos in range(5):
        out = tf({"rgb": img, "nir": img.clone()}, SampleRNG(0, 0, pos))
        assert torch.equal(out["rgb"], out["nir"])  # same flip and crop offset
        outs.append(out["rgb"])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # positions draw different crops
    assert torch.equal(tf({"rgb": img}, SampleRNG(0, 0, 3))["rgb"], outs[3])  # and the same key the same one
    with pytest.raises(ValueError, match="SampleRNG"):
        tf({"rgb": img})
    test_tf = PairedTransform((16, 8), (0.5,) * 3, (0.5,) * 3, train=False)
    x = test_tf({"rgb": img})["rgb"]
    assert torch.allclose(x, (img.float() / 255 - 0.5) / 0.5)


def test_dataset_cache_gives_the_same_tensors(synth_root):
    data = RGBNT201.load(synth_root, MODS)
    tf = PairedTransform((32, 16), (0.5,) * 3, (0.25,) * 3, train=False)
    a, b = MultiModalDataset(data.query[:4], MODS, tf), MultiModalDataset(data.query[:4], MODS, tf, cache=True)
    for i in range(4):
        x, y = a[i], b[i]
        assert set(x["images"]) == set(MODS) and x["images"]["rgb"].shape == (3, 32, 16)
        assert all(torch.equal(x["images"][m], y["images"][m]) for m in MODS)
        assert (x["pids"], x["cam_ids"], x["indices"]) == (y["pids"], y["cam_ids"], i)


def test_market1501_layout_parses_like_torchreid(tmp_path):
    from hybrid_reid.data.datasets import Market1501

    spec = SynthSpec(ids=12, cams=3, images_per_cam=2, seed=3, size=(64, 32))
    generate(str(tmp_path), spec, layout="market1501")
    data = Market1501.load(str(tmp_path), ["rgb"])
    n_test, n_train = spec.num_test, spec.ids - spec.num_test
    assert data.num_train_pids == n_train and len(data.train) == n_train * 3 * 2
    assert len(data.query) == n_test * 3  # the first image of every test identity and camera
    assert len(data.gallery) == n_test * 3 * 1 + 2  # the rest, plus 2 distractors; the 2 junk images dropped
    assert {s.pid for s in data.gallery} - {s.pid for s in data.query} == {0}
    assert all(0 <= s.camid < 3 for s in data.query + data.gallery) and data.num_cams == 3
    assert Market1501.load(str(tmp_path / "Market-1501-v15.09.15"), ["vis"]).modalities == ["rgb"]  # folders directly
    with pytest.raises(DataError, match="has only the rgb modality"):
        Market1501.load(str(tmp_path), ["rgb", "nir"])
    shutil.rmtree(tmp_path / "Market-1501-v15.09.15" / "query")
    with pytest.raises(DataError, match="query is missing"):
        Market1501.load(str(tmp_path), ["rgb"])
    with pytest.raises(DataError, match="has no bounding_box_train"):
        Market1501.load(str(tmp_path / "nowhere"), ["rgb"])


def test_random_erase_is_timms_algorithm_with_a_per_sample_generator():
    """The peers' erasing (timm RandomErasing, pixel mode, one box) draw for draw: the same boxes and
    noise when timm's global generators are seeded as our per-sample ones."""
    import random

    from timm.data.random_erasing import RandomErasing

    from hybrid_reid.data.transforms import random_erase

    timm_erase = RandomErasing(0.5, mode="pixel", max_count=1, device="cpu")
    erased = 0
    for pos in range(40):
        x = torch.randn(3, 32, 16, generator=torch.Generator().manual_seed(pos))
        rng = SampleRNG(7, 1, pos)
        ours = random_erase(x.clone(), rng, 0.5)
        ref_rng = SampleRNG(7, 1, pos)
        random.setstate(ref_rng.py.getstate())
        torch.set_rng_state(ref_rng.torch.get_state())
        ref = timm_erase(x.clone())
        assert torch.equal(ours, ref)
        erased += not torch.equal(ours, x)
    assert 10 < erased < 30  # about half of the images get a box


def test_training_batches_do_not_depend_on_workers_or_processes(synth_root):
    """The same keys give the same tensors in any worker, and two ranks' halves are the one-process batch."""
    from hybrid_reid.data import build_train_loader

    data = RGBNT201.load(synth_root, MODS)
    tf = PairedTransform((32, 16), (0.5,) * 3, (0.5,) * 3, train=True)

    def batches(workers, replicas=1, rank=0):
        loader = build_train_loader(data.train, MODS, tf, 8, 2, seed=3, num_workers=workers, num_replicas=replicas,
                                    rank=rank)
        loader.batch_sampler.set_epoch(1)
        return list(loader)

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) > 1
    for a, b in zip(zero, two):
        assert torch.equal(a["indices"], b["indices"])
        assert all(torch.equal(a["images"][m], b["images"][m]) for m in MODS)
    halves = [batches(0, 2, r) for r in range(2)]
    for step, full in enumerate(zero):
        parts = [halves[r][step] for r in range(2)]
        order = torch.cat([p["indices"] for p in parts]).argsort()
        merged = {m: torch.cat([p["images"][m] for p in parts])[order] for m in MODS}
        assert all(torch.equal(merged[m], full["images"][m][full["indices"].argsort()]) for m in MODS)
