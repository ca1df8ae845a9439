"""Helpers shared by the method tests that hold this project against the authors' fixtures
(``tests/fixtures/<method>/*.safetensors``: ``input.*``, ``state_dict.<their key>``, ``eval.*`` ...)."""
import torch


def close(ours, theirs, tol=1e-5):
    """Equal to float32 rounding: |ours - theirs| <= tol + tol * |theirs| (torch.allclose)."""
    return torch.allclose(ours, theirs.to(ours.dtype), rtol=tol, atol=tol)


def their_state_dict(fx, prefix=""):
    """The authors' ``model.state_dict()`` from a fixture (its float16-exact weights upcast, as their model
    ran), each key with ``prefix`` (``module.``: saved from DataParallel / DDP)."""
    return {prefix + k[len("state_dict."):]: v.float() if v.is_floating_point() else v for k, v in fx.items()
            if k.startswith("state_dict.")}


def their_checkpoint(fx, path, prefix=""):
    """Their checkpoint as their training loop saves it (``torch.save(model.state_dict())``) at ``path``."""
    torch.save(their_state_dict(fx, prefix), path)
    return str(path)


#: the authors' modality tags (RGBNT201's folders, their fixture's ``input.<tag>.u8``)
THEIRS = {"rgb": "RGB", "nir": "NI", "tir": "TI"}


def their_inputs(fx):
    """The network input of the fixtures' recipe: uint8 [4,3,32,16] -> normalised (mean = std = 0.5), x8 nearest."""
    return {m: ((fx[f"input.{t}.u8"].float() / 255 - 0.5) / 0.5).repeat_interleave(8, 2).repeat_interleave(8, 3)
            for m, t in THEIRS.items()}


def write_their_rgbnt201(fx, root, extra_train_camera=None):
    """The fixture's four images (x8 nearest) as an RGBNT201 folder under ``root`` in both splits (lossless
    PNG; identity and camera in the names); ``extra_train_camera``: also a copy of image 0 at that camera
    (1-based) in the training split, so the data set has that many camera rows. Returns ``root``."""
    from PIL import Image

    for split in ("train_171", "test"):
        for t in THEIRS.values():
            d = root / "RGBNT201" / split / t
            d.mkdir(parents=True)
            u8 = fx[f"input.{t}.u8"].repeat_interleave(8, 2).repeat_interleave(8, 3)
            for i in range(4):
                pid, cam = int(fx["input.label"][i]), int(fx["input.cam_label"][i])
                Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(d / f"{pid:06d}_cam{cam + 1}_{i:02d}.png")
            if split == "train_171" and extra_train_camera is not None:
                Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(d / f"000009_cam{extra_train_camera}_99.png")
    return root
