"""Torch data sets, the PK identity sampler and the loaders the engine uses.

A batch is a dict: ``{"images": {modality: [B, 3, H, W]}, "pids": [B], "cam_ids": [B],
"view_ids": [B], "indices": [B]}``; the ``text`` modality is token ids ``[B, L]`` under ``images``, and so is
an image modality's own caption (IDEA) under ``caption_key(m)`` (``rgb:caption``) when the model reads one.

Randomness belongs to the sample, not to the worker: the training sampler yields
:class:`SampleKey` s ``(index, epoch, position)`` — ``position`` is the sample's place in the epoch's
global batch order — and the data set seeds that sample's augmentation (and ORBench's draw of its
unpaired images) from ``(seed, epoch, position)``. An epoch's batches are therefore the same for
any ``data.num_workers`` and any number of training processes.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..modalities import caption_key, image_modalities, is_text
from .datasets import DataError, Sample, open_image
from .transforms import PairedTransform, SampleRNG


class SampleKey(NamedTuple):
    """What a training batch sampler yields per sample: the data set index, the epoch and the
    sample's position in the epoch's global batch order (which seeds its random decisions)."""

    index: int
    epoch: int
    position: int


class MultiModalDataset(Dataset):
    """``samples[i]`` -> ``{"images": {m: tensor}, "pids", "cam_ids", "view_ids", "indices"}``.

    Args:
        samples: the split.
        modalities: which of each sample's paths to read.
        transform: decoding (:meth:`PairedTransform.load`) and augmentation.
        cache: decode and resize every image once, up front (uint8 at the network size, shared
            with forked loader workers); then a step only augments. Costs ``3*H*W`` bytes per image.
        resample: draw unpaired modalities (``Sample.pools``, ORBench) afresh for every
            :class:`SampleKey` (training); otherwise each sample's fixed ``paths`` are used.
        seed: the run's seed, mixed into every sample's random stream.
        tokenize: the model's tokenizer: ``tokenize(texts)`` for the ``text`` modality; when it also
            has ``caption(modality, description)`` (a model that reads a caption per image modality,
            IDEA), every image modality's caption (``Sample.captions``) is delivered as token ids under
            ``caption_key(m)``.

    Indexing with a :class:`SampleKey` seeds the sample's augmentation and draws from ``(seed,
    epoch, position)``; a plain ``int`` index is the sample without randomness (evaluation), or, for
    a training transform, the key ``(i, 0, i)``.
    """

    def __init__(self, samples: Sequence[Sample], modalities: Sequence[str], transform: PairedTransform,
                 cache: bool = False, tokenize: Optional[Callable[[str], torch.Tensor]] = None,
                 resample: bool = False, seed: int = 0) -> None:
        self.samples = list(samples)
        self.modalities = image_modalities(modalities)
        self.text = next((m for m in modalities if is_text(m)), None)
        self.with_text = self.text is not None
        if self.with_text and tokenize is None:
            raise ValueError("the text modality needs a tokenizer (the model's text_encoder.tokenize)")
        for m in self.modalities:
            lacking = next((s for s in self.samples if m not in s.paths), None)
            if lacking is not None:
                raise DataError(f"modality {m!r} requested but sample {lacking.paths} (pid {lacking.pid}) has no "
                                f"{m!r} image")
        self.tokenize = tokenize
        self.caption = getattr(tokenize, "caption", None)
        if self.caption is not None:
            lacking = next((s for s in self.samples if not s.captions or any(m not in s.captions
                                                                              for m in self.modalities)), None)
            if lacking is not None:
                raise DataError(f"the model reads a caption per image modality (model.inverted_text), but sample "
                                f"{lacking.paths} (pid {lacking.pid}) has none for {self.modalities}; set "
                                "data.modality_captions=true and put the caption files in <DATASET>/text/")
        self._caption_ids: Dict[Tuple[str, str], torch.Tensor] = {}
        self.transform = transform
        self.resample = resample
        self.seed = int(seed)
        self.cache: Optional[Dict[Tuple[str, Optional[Tuple[int, int]]], torch.Tensor]] = None
        if cache:
            self.cache = {}
            for s in self.samples:
                for m in self.modalities:
                    for path in self._candidates(s, m):
                        key = self._key(s, m, path)
                        if key not in self.cache:
                            self.cache[key] = self._read(*key)

    def __len__(self) -> int:
        return len(self.samples)

    def _candidates(self, s: Sample, m: str) -> Sequence[str]:
        return s.pools[m] if self.resample and s.pools and m in s.pools else (s.paths[m],)

    @staticmethod
    def _key(s: Sample, m: str, path: str) -> Tuple[str, Optional[Tuple[int, int]]]:
        """What identifies a decoded image: the file and the strip of it ``m`` uses (``Sample.crops``)."""
        return path, s.crops.get(m) if s.crops else None

    def _read(self, path: str, crop: Optional[Tuple[int, int]]) -> torch.Tensor:
        try:
            return self.transform.load(open_image(path, crop))
        except Exception as e:
            raise DataError(f"unreadable image {path}: {type(e).__name__}: {e}") from None

    def _image(self, s: Sample, m: str, rng: Optional[SampleRNG]) -> torch.Tensor:
        candidates = self._candidates(s, m)
        key = self._key(s, m, candidates[0] if len(candidates) == 1 or rng is None else rng.py.choice(candidates))
        return self.cache[key] if self.cache is not None else self._read(*key)

    def __getitem__(self, key: Union[int, SampleKey]) -> Dict[str, object]:
        if not isinstance(key, SampleKey) and (self.transform.train or self.resample):
            key = SampleKey(int(key), 0, int(key))
        rng = SampleRNG(self.seed, key.epoch, key.position) if isinstance(key, SampleKey) else None
        i = key.index if isinstance(key, SampleKey) else int(key)
        s = self.samples[i]
        images = {m: self._image(s, m, rng) for m in self.modalities}
        inputs = self.transform(images, rng) if self.transform.train else self.transform(images)
        if self.with_text:
            inputs[self.text] = self.tokenize(s.text or "")[0]
        if self.caption is not None:
            for m in self.modalities:
                key = (m, s.captions[m])
                if key not in self._caption_ids:  # tokenised once per distinct caption
                    self._caption_ids[key] = self.caption(m, s.captions[m])
                inputs[caption_key(m)] = self._caption_ids[key]
        return {"images": inputs, "pids": s.pid, "cam_ids": s.camid, "view_ids": s.viewid, "indices": i}


class PKSampler(Sampler[List[int]]):
    """Batches of P identities x K images (a batch sampler), split across ranks.

    Every epoch has ``max(1, len(pids) // batch_size)`` global batches. Identities are drawn from
    a stream of shuffled permutations (each identity appears about equally often, never twice in
    one batch); each identity's K images come from its own stream of shuffled permutations (an
    identity with fewer than K images repeats some, as torchreid's sampler does). With R ranks,
    rank r takes identities ``r, r+R, ...`` of every global batch: ``P/R * K`` images per rank
    and step, the global batch unchanged. The order depends only on ``seed`` and the epoch
    (:meth:`set_epoch`), so a resumed run sees the same batches. Batches are lists of
    :class:`SampleKey` (index, epoch, position in the epoch's global order), which seed each
    sample's augmentation in :class:`MultiModalDataset`.

    With ``shards`` S (``train.shards``), every global batch is dealt into S shards instead (shard
    s takes identities ``s, s+S, ...``); rank r yields its S/R shards ``r*S/R ...`` one after
    another, each as a batch.

    Args:
        pids: the label of every sample.
        batch_size: P*K over all ranks.
        num_instances: K.
        seed: base seed.
        num_replicas, rank: the data-parallel world (default: a single process).
        shards: batches per global batch (default: ``num_replicas``, one per rank).
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shards: Optional[int] = None) -> None:
        if num_instances <= 0 or batch_size % num_instances:
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of data.num_instances={num_instances}")
        self.p, self.k = batch_size // num_instances, num_instances
        self.shards = shards or num_replicas
        if self.shards % num_replicas:
            raise ValueError(f"train.shards={self.shards} cannot be split evenly over {num_replicas} processes; "
                             "use a process count that divides it")
        if self.p % self.shards:
            what = f"train.shards={self.shards}" if shards else f"{num_replicas} processes"
            raise ValueError(f"{self.p} identities per batch (data.batch_size / data.num_instances) cannot be "
                             f"split evenly over {what}")
        self.index_of: Dict[int, np.ndarray] = {}
        for i, p in enumerate(pids):
            self.index_of.setdefault(int(p), []).append(i)
        self.index_of = {p: np.asarray(ix) for p, ix in self.index_of.items()}
        self.ids = np.asarray(sorted(self.index_of))
        if len(self.ids) < self.p:
            raise ValueError(f"{self.p} identities per batch but the training split has only {len(self.ids)}; "
                             "lower data.batch_size or raise data.num_instances")
        self.batch_size, self.seed = batch_size, seed
        self.num_batches = max(1, len(pids) // batch_size)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * (self.shards // self.num_replicas)

    def global_batches(self) -> List[List[List[int]]]:
        """This epoch's global batches: ``[batch][identity] -> K sample indices``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        id_stream: List[int] = []
        cursors = {p: (rng.permutation(ix), 0) for p, ix in self.index_of.items()}

        def take_images(p: int) -> List[int]:
            perm, c = cursors[p]
            out = []
            while len(out) < self.k:
                if c == len(perm):
                    perm, c = rng.permutation(self.index_of[p]), 0
                n = min(self.k - len(out), len(perm) - c)
                out.extend(perm[c:c + n].tolist())
                c += n
            cursors[p] = (perm, c)
            return out

        batches = []
        for _ in range(self.num_batches):
            chosen: List[int] = []
            while len(chosen) < self.p:
                if not id_stream:
                    id_stream = rng.permutation(self.ids).tolist()
                pick = next((j for j, p in enumerate(id_stream) if p not in chosen), None)
                if pick is None:  # the rest of the stream is already in this batch: start a new permutation
                    id_stream = rng.permutation(self.ids).tolist() + id_stream
                    continue
                chosen.append(id_stream.pop(pick))
            batches.append([take_images(p) for p in chosen])
        return batches

    def __iter__(self) -> Iterator[List[SampleKey]]:
        per_rank = self.shards // self.num_replicas
        for b, batch in enumerate(self.global_batches()):
            start = b * self.batch_size
            keys = [SampleKey(i, self.epoch, start + j * self.k + n)
                    for j, ids in enumerate(batch) for n, i in enumerate(ids)]
            for shard in range(self.rank * per_rank, (self.rank + 1) * per_rank):
                mine = [keys[j * self.k:(j + 1) * self.k] for j in range(shard, len(batch), self.shards)]
                yield [key for ids in mine for key in ids]


def build_train_loader(samples: Sequence[Sample], modalities: Sequence[str], transform: PairedTransform,
                       batch_size: int, num_instances: int, seed: int, num_workers: int,
                       num_replicas: int = 1, rank: int = 0, cache: bool = False,
                       tokenize: Optional[Callable[[str], torch.Tensor]] = None,
                       shards: Optional[int] = None) -> DataLoader:
    """The training loader: P x K batches of this rank's identities, each sample's augmentation
    seeded by (``seed``, epoch, position), so its batches do not depend on ``num_workers`` or on
    the number of processes. ``pin_memory`` and persistent workers are on when a GPU is used.
    ``shards``: see :class:`PKSampler` (``train.shards``)."""
    sampler = PKSampler([s.pid for s in samples], batch_size, num_instances, seed, num_replicas, rank, shards)
    gpu = torch.cuda.is_available()
    return DataLoader(MultiModalDataset(samples, modalities, transform, cache, tokenize, resample=True, seed=seed),
                      batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=gpu and num_workers > 0, pin_memory=gpu)


def build_test_loader(samples: Sequence[Sample], modalities: Sequence[str], transform: PairedTransform,
                      batch_size: int, num_workers: int, cache: bool = False,
                      tokenize: Optional[Callable[[str], torch.Tensor]] = None) -> DataLoader:
    return DataLoader(MultiModalDataset(samples, modalities, transform, cache, tokenize), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, pin_memory=torch.cuda.is_available())

