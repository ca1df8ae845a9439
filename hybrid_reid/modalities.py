"""Modalities as data: one spec per modality, one place that knows them.

Every part that used to test ``m == "text"`` or ``m == "rgb"`` asks this module instead:

* :func:`canonical` turns a name or alias (``vis``, ``ni``, ``th``, ``sk``, ``cp`` ...) into the
  canonical name;
* :func:`is_text` / :func:`image_modalities` separate token-id inputs from images;
* the *anchor* (``data.anchor_modality``, ``rgb`` by default) is the modality every other one is
  aligned to (SDM) and the gallery of the ORBench protocol.

A new image modality (depth, event ...) is a YAML edit::

    modalities:
      depth: {channels: 1, aliases: [d, DEPTH], short: d}
    data:
      modalities: [rgb, depth]
      modality_dirs: {depth: Depth}     # the data set's folder for it (RGBNT201-style layouts)

:func:`register` is what the config does with that section; registering a name twice with the same
spec is a no-op, with another spec an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Literal, Tuple

__all__ = ["TEXT", "Modality", "register", "get", "canonical", "is_text", "image_modalities", "names", "short_name",
           "caption_key", "caption_modality"]

#: the name of the caption modality data sets fill from their caption files
TEXT = "text"


@dataclass(frozen=True)
class Modality:
    """One input modality.

    Attributes:
        name: canonical name (``rgb``, ``nir``, ``tir``, ``sketch`` ...).
        kind: ``image`` (a [B, C, H, W] tensor) or ``text`` (token ids [B, L] for the text tower).
        channels: image channels a per-modality tokenizer is built with by default (1 or 3).
        aliases: other names data sets use for it (``vis``, ``NI``, ``th``, ``sk`` ...).
        short: the letter RGBNT201's missing-modality table uses (``r``, ``n``, ``t``), or ``""``.
    """

    name: str
    kind: Literal["image", "text"] = "image"
    channels: int = 3
    aliases: Tuple[str, ...] = field(default_factory=tuple)
    short: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("image", "text"):
            raise ValueError(f"modality {self.name!r}: kind must be image or text, got {self.kind!r}")
        if self.kind == "image" and self.channels not in (1, 3):
            raise ValueError(f"modality {self.name!r}: channels must be 1 or 3, got {self.channels}")


_REGISTRY: Dict[str, Modality] = {}
_ALIASES: Dict[str, str] = {}


def register(spec: Modality) -> Modality:
    """Add a modality (and its aliases). The same spec again is a no-op; a clash is an error."""
    known = _REGISTRY.get(spec.name)
    if known is not None:
        if known != spec:
            raise ValueError(f"modality {spec.name!r} is already defined as {known}; pick another name")
        return known
    for alias in (spec.name, *spec.aliases):
        owner = _ALIASES.get(alias.lower())
        if owner is not None and owner != spec.name:
            raise ValueError(f"modality alias {alias!r} of {spec.name!r} already names {owner!r}")
    _REGISTRY[spec.name] = spec
    for alias in (spec.name, *spec.aliases):
        _ALIASES[alias.lower()] = spec.name
    return spec


for _spec in (
    Modality("rgb", aliases=("vis", "visible"), short="r"),
    Modality("nir", aliases=("ni",), short="n"),
    Modality("tir", aliases=("th", "ti", "thermal"), short="t"),
    Modality("ir"),  # the infrared camera of IR-RGB data sets, its own modality
    Modality("sketch", aliases=("sk",)),
    Modality("cpencil", aliases=("cp",)),
    Modality("text", kind="text"),
):
    register(_spec)


def canonical(name: str) -> str:
    """``vis`` -> ``rgb``, ``ni`` -> ``nir``, ``th``/``ti`` -> ``tir``, ``sk`` -> ``sketch``,
    ``cp`` -> ``cpencil``; unknown names are an error listing the known ones."""
    try:
        return _ALIASES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown modality {name!r}; known: {sorted(_REGISTRY)} (aliases: {sorted(_ALIASES)}); "
                         "declare a new one in the config's modalities: section") from None


def get(name: str) -> Modality:
    return _REGISTRY[canonical(name)]


def is_text(name: str) -> bool:
    return get(name).kind == "text"


def image_modalities(names_: Iterable[str]) -> List[str]:
    """The image modalities among ``names_`` (text left out), in order."""
    return [m for m in names_ if not is_text(m)]


def names() -> List[str]:
    return sorted(_REGISTRY)


def short_name(names_: Iterable[str]) -> str:
    """A case name for a set of modalities: ``rn`` when every one has a short letter, else ``a+b``."""
    names_ = list(names_)
    specs = [get(m) for m in names_]
    return "".join(s.short for s in specs) if all(s.short for s in specs) else "+".join(names_)


#: a batch's ``images`` carries an image modality's own caption (IDEA's per-modality captions, token ids
#: [B, L]) under ``caption_key(m)``, beside the image itself under ``m``
CAPTION_SUFFIX = ":caption"


def caption_key(modality: str) -> str:
    """The batch key of ``modality``'s own caption (``rgb`` -> ``rgb:caption``)."""
    return f"{modality}{CAPTION_SUFFIX}"


def caption_modality(key: str):
    """The image modality whose caption ``key`` holds, or None when ``key`` is not a caption key."""
    return key[:-len(CAPTION_SUFFIX)] if key.endswith(CAPTION_SUFFIX) else None
