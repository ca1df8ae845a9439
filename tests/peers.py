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
