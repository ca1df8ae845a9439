"""Training and evaluation with HF Accelerate: one visible training function.

Shaped like accelerate's ``examples/complete_cv_example.py``::

    Accelerator -> seed -> data -> model -> optimizer / scheduler -> prepare -> [load_state]
      -> for epoch: for batch: accumulate / backward / clip / step -> log
                    [evaluate with gather_for_metrics] -> save_state (atomic)
      -> metrics.json, model.safetensors

Outputs in ``cfg.output_dir``: ``config.yaml`` (resolved), ``log.jsonl`` (a record per logged
step and per epoch), ``log.csv`` (per epoch), ``tensorboard/``, ``checkpoints/epoch_NNN/``
(``accelerator.save_state``; the last ``train.keep_checkpoints`` kept), ``model.safetensors``
and ``metrics.json``. Only the main process writes.

Several processes (``torchrun`` or ``accelerate launch``): every rank takes ``1/R`` of the
identities of each global P x K batch (:class:`~hybrid_reid.data.PKSampler`), so the optimizer
sees the same global batch and the same number of steps as one process; evaluation shards the
test set and gathers the features with ``gather_for_metrics``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..config import Config, ConfigError, OptimConfig, TrainConfig, load_config, to_dict
from ..config.schema import TRACKERS
from ..data import PairedTransform, ReIDData, build_train_loader, load_data
from ..losses import build_criterion
from ..models import CheckpointError, ReIDModel, build_model, load_model_weights
from ..models.model import group_learning_rates
from ..models.sync_bn import convert_sync_batchnorm
from ..pretrained import save_pretrained, write_model_card
from ..utils import require_packages, write_atomic
from .evaluator import METRIC_KEYS, Evaluator, metrics_table, save_features
from .shards import ShardedStep
from .state import (
    CHECKPOINT_PREFIX,
    LOCK_NAME,
    RunLock,
    check_fresh_output_dir,
    find_checkpoint,
    remove_leftovers,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "class_embedding", "positional_embedding")


# ------------------------------------------------------------------------------------------ setup

def resolve_config(cfg: Config, data: ReIDData) -> Config:
    """Fill in what the data set decides: classes, cameras (when SIE is on) and views."""
    m = cfg.model
    num_cams = data.num_cams if m.num_cams > 0 else 0
    num_views = data.num_views if m.num_views > 0 else 0
    if m.num_cams > 0 and m.num_cams != num_cams:
        logger.info("model.num_cams: %d -> %d (from the data set)", m.num_cams, num_cams)
    model = dataclasses.replace(m, num_classes=data.num_train_pids, num_cams=num_cams, num_views=num_views)
    data_cfg = dataclasses.replace(cfg.data, modalities=list(data.modalities))
    return dataclasses.replace(cfg, model=model, data=data_cfg)


def build_optimizer(model: ReIDModel, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (``optim.name``: or Adam, or SGD) over the model's named parameter groups; no weight decay on 1-d
    parameters and embeddings; biases at ``optim.bias_lr_factor`` x their group's rate.

    ``fused``: torch's fused kernel (one launch for all parameters; the engine asks for it on CUDA)."""
    groups = model.param_groups()
    lrs = group_learning_rates(list(groups), cfg.lr, cfg.group_lr)
    param_groups = []
    for name, params in groups.items():
        decays = [p.ndim > 1 and not n.endswith(NO_DECAY_SUFFIXES) for n, p in params]
        biases = [n.endswith(".bias") for n, _ in params]
        lr = lrs[name]
        for suffix, wd, bias in (("", cfg.weight_decay, False), (".no_decay", 0.0, False),
                                 (".bias", 0.0, True)):
            want_decay = suffix == ""
            ps = [p for (_, p), d, b in zip(params, decays, biases)
                  if (b and cfg.bias_lr_factor != 1.0) == bias and (bias or d == want_decay)]
            if ps:
                param_groups.append({"params": ps, "lr": lr * (cfg.bias_lr_factor if bias else 1.0),
                                     "weight_decay": wd, "name": name + suffix})
    kwargs = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, **kwargs)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)


def lr_factor(step: int, total: int, warmup: int, warmup_factor: float, min_ratio: float) -> float:
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return warmup_factor + (1 - warmup_factor) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_factor, cfg.min_lr_ratio))


def _transform(cfg: Config, model: ReIDModel, train: bool) -> PairedTransform:
    d = cfg.data
    return PairedTransform(cfg.model.img_size, model.encoder.mean, model.encoder.std, train=train,
                           flip_prob=d.flip_prob, pad=d.pad, erasing_prob=d.erasing_prob)


def _tokenizer(model: ReIDModel):
    return model.tokenizer


def _evaluator(accelerator: Accelerator, cfg: Config, data: ReIDData, model: ReIDModel) -> Evaluator:
    return Evaluator(accelerator, cfg, data, _transform(cfg, model, train=False), _tokenizer(model),
                     handles_missing=model.modality_fusion.handles_missing)


class TrainProgress:
    """Epochs and optimizer steps done, and the non-finite steps skipped; saved in every
    checkpoint's manifest (``checkpoint.json``), not as a pickle."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step = 0  # optimizer steps attempted, skipped ones included (debug.nan_at_steps counts these)
        self.skipped = 0  # non-finite steps skipped in the whole run
        self.bad_run = 0  # consecutive non-finite steps up to now

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "skipped": self.skipped, "bad_run": self.bad_run}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped, self.bad_run = int(state.get("skipped", 0)), int(state.get("bad_run", 0))


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""


def _all_processes(accelerator: Accelerator, flags: torch.Tensor) -> List[bool]:
    """``flags`` (bool [K]) AND-ed over the processes, on the host: the one device sync of an
    optimizer step's guard (one decision for all ranks, so DDP stays in step)."""
    flags = flags.detach().reshape(-1).float()
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags.reshape(1, -1)).min(dim=0).values
    return [bool(v) for v in flags.tolist()]


# train.deterministic's torch switches: (deterministic algorithms, cuDNN deterministic, cuDNN autotuning)
DETERMINISTIC_SWITCHES = (True, True, False)


def set_determinism_switches(switches: Tuple[bool, bool, bool]) -> Tuple[bool, bool, bool]:
    """Set (deterministic algorithms, cuDNN deterministic, cuDNN autotuning); returns the previous three."""
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(switches[0])
    cudnn.deterministic, cudnn.benchmark = switches[1], switches[2]
    return before


def apply_determinism(enabled: bool) -> None:
    """``train.deterministic``: the torch / cuDNN / cuBLAS switches for bitwise-repeatable GPU runs."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GPU work
    set_determinism_switches(DETERMINISTIC_SWITCHES)
    logger.info("train.deterministic: deterministic algorithms on, cuDNN autotuning off, CUBLAS_WORKSPACE_CONFIG=%s. "
                "Cost: GPU kernels without a deterministic variant raise an error, and scatter / index_add / "
                "cuDNN convolutions use slower deterministic kernels (README, Reproducibility)",
                os.environ["CUBLAS_WORKSPACE_CONFIG"])


# Keys a resumed run may change: they cannot change the weights or the numbers the run reports.
RESUME_SAFE_KEYS = ("data.num_workers", "data.test_batch_size", "data.cache_images", "train.eval_every",
                    "train.log_every", "train.keep_checkpoints", "train.max_bad_steps", "train.log_with", "output_dir",
                    "eval.chunk_size", "debug.pause_after_step")


def _flatten(d: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Dict[str, object], new: Dict[str, object]) -> List[Tuple[str, object, object]]:
    """``(key, old value, new value)`` for every dotted key whose value differs, apart from
    :data:`RESUME_SAFE_KEYS`."""
    a, b = _flatten(old), _flatten(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_SAFE_KEYS or any(key.startswith(k + ".") for k in RESUME_SAFE_KEYS):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changed.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return changed


class ConfigChangedError(ValueError):
    """``--resume`` with a config that differs from the run's in a key that affects training."""


def check_resume_config(cfg: Config, allow_change: bool) -> None:
    """Compare the resolved ``cfg`` with ``OUTPUT_DIR/config.yaml`` of the run being resumed."""
    path = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    try:  # through the schema, so an older run's shorthand (model.backbone) compares as its towers
        old = to_dict(load_config(path))
    except ConfigError as e:
        if allow_change:
            logger.warning("--allow-config-change: the run's %s no longer loads (%s); resuming with the new config",
                           path, e)
            return
        raise ConfigChangedError(f"--resume: the run's {path} no longer loads ({e}); resume with "
                                 "--allow-config-change to use the new config as it is") from None
    changes = config_changes(old, to_dict(cfg))
    if not changes:
        return
    listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changes)
    if not allow_change:
        raise ConfigChangedError(f"--resume: the config differs from the run's {path} in {listed}; the checkpoint "
                                 "was trained with the old values. Resume with the same config, or pass --resume "
                                 "--allow-config-change to continue with the new ones")
    logger.warning("--allow-config-change: resuming with a changed config: %s", listed)


# ------------------------------------------------------------------------------- outputs, logging

class RunLog:
    """``log.jsonl`` (every record) and ``log.csv`` (epoch records) in the output folder; main process only."""

    CSV_FIELDS = ["epoch", "step", "lr", "loss", "mAP", "rank1", "rank5", "rank10", "mINP", "epoch_time_s"]

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.dir, self.enabled = output_dir, enabled

    def start(self, done_epochs: int) -> None:
        """Drop records of epochs after ``done_epochs`` (all of them for a fresh run): a resumed run
        re-logs the epochs the interrupted one had not checkpointed. A last line cut short by a
        kill is dropped too."""
        if not self.enabled:
            return
        jsonl, csv_path = os.path.join(self.dir, "log.jsonl"), os.path.join(self.dir, "log.csv")
        if done_epochs == 0 or not os.path.exists(jsonl):
            for p in (jsonl, csv_path):
                if os.path.exists(p):
                    os.remove(p)
            return
        records = []
        with open(jsonl) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line the killed run did not finish
                    continue
        keep = [r for r in records if r.get("epoch", 0) <= done_epochs]
        write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in keep))
        if os.path.exists(csv_path):
            os.remove(csv_path)
        for r in keep:
            if r.get("kind") == "epoch":
                self._write_csv(r)

    def _write_csv(self, record: Dict[str, object]) -> None:
        path = os.path.join(self.dir, "log.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(record)

    def write(self, record: Dict[str, object]) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") == "epoch":
            self._write_csv(record)


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    return {k: _rounded(x) for k, x in v.items()} if isinstance(v, dict) else v


def write_metrics(path: str, metrics: Dict[str, object], extra: Dict[str, object]) -> Dict[str, object]:
    out = {k: _rounded(v) for k, v in metrics.items() if k != "cmc"}
    out.update(extra)
    out["cmc"] = [round(c, 4) for c in metrics.get("cmc", [])]
    write_atomic(path, json.dumps(out, indent=2) + "\n")
    return out


def report_metrics(cfg: Config, data: ReIDData, accelerator: Accelerator, metrics: Dict[str, object],
                   t_start: float, path: Optional[str] = None, **extra: object) -> Dict[str, object]:
    """Write ``path`` (default ``OUTPUT_DIR/metrics.json``: the metrics, ``extra`` and the run's facts)
    and log it."""
    path = path or os.path.join(cfg.output_dir, "metrics.json")
    result = write_metrics(path, metrics, {
        **extra, "dataset": cfg.data.name, "modalities": data.modalities, "backbone": cfg.model.label,
        "towers": {t: s.arch for t, s in cfg.model.towers.items()},
        "fusion": cfg.model.fusion if len(cfg.model.towers) > 1 else None,
        "modality_fusion": cfg.model.modality_fusion, "query_modalities": cfg.eval.query_modalities,
        "gallery_modalities": cfg.eval.gallery_modalities, "rerank": cfg.eval.rerank, "aqe": cfg.eval.aqe,
        "num_query": sum(map(len, data.query_sets.values())) if data.query_sets else len(data.query),
        "num_gallery": len(data.gallery), "num_processes": accelerator.num_processes,
        "wall_time_s": round(time.time() - t_start, 1)})
    logger.info("metrics: mAP %.2f  rank1 %.2f  rank5 %.2f  mINP %.2f -> %s", result["mAP"], result["rank1"],
                result["rank5"], result["mINP"], path)
    print(metrics_table(result), flush=True)
    return result


def _cpu_only() -> bool:
    """No GPU: tell Accelerate, so that ``torchrun`` on a CPU machine starts a gloo process group
    (without ``cpu=True`` Accelerate ignores the torchrun environment and every rank trains alone)."""
    return not torch.cuda.is_available()


def _trackers(cfg: Config) -> List[str]:
    """Accelerate's trackers of ``train.log_with`` (``csv`` is the run's own ``log.csv``).

    Raises:
        MissingPackageError: a tracker's package is not installed (before anything is written)."""
    wanted = [t for t in cfg.train.log_with if t != "csv"]
    require_packages(f"train.log_with={cfg.train.log_with}", {TRACKERS[t]: TRACKERS[t] for t in wanted})
    return wanted


def tracker_config(cfg: Config) -> Dict[str, object]:
    """The resolved config as flat hyper-parameters (``model.towers.clip.arch``: ...); values a
    tracker cannot hold as they are (lists, None) as strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for k, v in _flatten(to_dict(cfg)).items()}


# ---------------------------------------------------------------------------------------- train

def train(cfg: Config, resume: Optional[str] = None, allow_config_change: bool = False) -> Dict[str, object]:
    """Train ``cfg``'s model on its data set, evaluate it, write the outputs; returns ``metrics.json``.

    Args:
        cfg: the whole config.
        resume: ``None`` (a new run: ``cfg.output_dir`` must be empty or absent); ``"latest"`` (the
            newest intact checkpoint in ``cfg.output_dir``, falling back past bad ones); or a
            checkpoint folder.
        allow_config_change: resume although ``cfg`` differs from the run's ``config.yaml`` in keys
            that affect training (logged); otherwise that is a :class:`ConfigChangedError`.

    Raises:
        RunLockedError: another run is using ``cfg.output_dir``.
        OutputDirNotEmptyError: a new run (no ``resume``) over an earlier one.
        ConfigChangedError: ``resume`` with a config that changes training.
        CheckpointError: the checkpoint to resume from is incomplete, corrupted or unsafe.
        TrainingDiverged: ``train.max_bad_steps`` consecutive non-finite steps.
    """
    apply_determinism(cfg.train.deterministic)
    # train.compile: Accelerate compiles the model last, after the DDP wrapper (None: the launcher's choice)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum, log_with=_trackers(cfg) or None,
                              project_dir=cfg.output_dir, step_scheduler_with_optimizer=False, cpu=_cpu_only(),
                              dynamo_backend="inductor" if cfg.train.compile else None)
    created = not os.path.exists(cfg.output_dir)
    lock = RunLock(cfg.output_dir).acquire() if accelerator.is_main_process else None
    try:
        if resume is None:
            check_fresh_output_dir(cfg.output_dir)
        accelerator.wait_for_everyone()
        return _train(accelerator, cfg, resume, allow_config_change)
    finally:
        if lock is not None:
            lock.release()
            if created and os.listdir(cfg.output_dir) == [LOCK_NAME]:  # failed before writing anything
                shutil.rmtree(cfg.output_dir, ignore_errors=True)


def _prepare_model(accelerator: Accelerator, cfg: Config, model: ReIDModel) -> ReIDModel:
    """Global-batch BatchNorm when several processes train (``model.sync_bn``); per-shard BatchNorm
    with ``train.shards``."""
    if cfg.train.shards and cfg.model.sync_bn:
        raise ValueError(f"model.sync_bn=true contradicts train.shards={cfg.train.shards}: every shard normalises "
                         "with its own statistics; leave model.sync_bn unset (or false)")
    if cfg.train.shards:
        logger.info("train.shards=%d: every global batch is %d independent shards of %d samples (%d per process), "
                    "summed in shard order: the same bits for any process count dividing %d", cfg.train.shards,
                    cfg.train.shards, cfg.data.batch_size // cfg.train.shards,
                    cfg.train.shards // accelerator.num_processes, cfg.train.shards)
    elif accelerator.num_processes > 1 and cfg.model.sync_bn is not False:
        n = convert_sync_batchnorm(model)
        logger.info("model.sync_bn: %d BatchNorm layer(s) normalise over the global batch of %d processes", n,
                    accelerator.num_processes)
    if cfg.train.compile:
        logger.info("train.compile: the model runs under torch.compile (inductor, through Accelerate)")
    return model


def _pause_if_asked(cfg: Config, step: int, main: bool) -> None:
    """``debug.pause_after_step``: write ``OUTPUT_DIR/.paused`` and wait until it is deleted."""
    if cfg.debug.pause_after_step != step or not main:
        return
    flag = os.path.join(cfg.output_dir, PAUSE_FILE)
    write_atomic(flag, f"{step}\n")
    logger.warning("debug.pause_after_step=%d: paused; delete %s to continue", step, flag)
    while os.path.exists(flag):
        time.sleep(0.05)


PAUSE_FILE = ".paused"


def _train(accelerator: Accelerator, cfg: Config, resume: Optional[str], allow_config_change: bool = False
           ) -> Dict[str, object]:
    t_start = time.time()
    tc = cfg.train
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the main process generates the synthetic set first
        data = load_data(cfg.data)
    cfg = resolve_config(cfg, data)
    if resume is not None:
        check_resume_config(cfg, allow_config_change)
    if main:
        logger.info("data %s:\n%s", cfg.data.name, data.summary_table())

    model = build_model(cfg.model, modalities=data.modalities, anchor=cfg.data.anchor_modality)
    num_params = sum(p.numel() for p in model.parameters())
    evaluator = _evaluator(accelerator, cfg, data, model)  # a bad eval.* setting fails now, not after training
    train_loader = build_train_loader(
        data.train, data.modalities, _transform(cfg, model, train=True), cfg.data.batch_size,
        cfg.data.num_instances, cfg.seed, cfg.data.num_workers, accelerator.num_processes, accelerator.process_index,
        cfg.data.cache_images, _tokenizer(model), tc.shards)
    sampler = train_loader.batch_sampler
    shards = ShardedStep(accelerator, tc.shards, cfg.seed) if tc.shards else None
    micro_per_step = shards.per_process if shards else tc.grad_accum
    steps_per_epoch = len(train_loader) // micro_per_step
    if tc.epochs and steps_per_epoch == 0:
        raise ValueError(f"train.grad_accum={tc.grad_accum} exceeds the {len(train_loader)} batches per epoch")
    optimizer = build_optimizer(model, cfg.optim, fused=accelerator.device.type == "cuda")
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    criterion = build_criterion(cfg.loss, cfg.model.clip_consistency, cfg.data.anchor_modality,
                                gather=tc.shards is None)
    model = _prepare_model(accelerator, cfg, model)
    # the train loader is not prepared: PKSampler already splits each global batch over the ranks
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = TrainProgress()
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    if main:
        remove_leftovers(ckpt_dir)  # temp folders of a killed run
    if resume is not None:
        path, manifest = find_checkpoint(cfg.output_dir, resume)
        try:
            accelerator.load_state(path)
        except Exception as e:
            raise CheckpointError(f"{path}: could not be restored into this run ({type(e).__name__}: {e}); check "
                                  "that the config is the one the checkpoint was written with") from None
        progress.load_state_dict(manifest["progress"])
        logger.info("resumed from %s (epoch %d, step %d)", path, progress.epoch, progress.step)
    run_log = RunLog(cfg.output_dir, main)
    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        run_log.start(progress.epoch)
        write_atomic(os.path.join(cfg.output_dir, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if accelerator.log_with:
        if accelerator.is_main_process:  # TensorBoard's events stay in OUTPUT_DIR/tensorboard (not .../<project>)
            from accelerate.tracking import TensorBoardTracker

            accelerator.log_with = [TensorBoardTracker("tensorboard", cfg.output_dir) if str(t) == "tensorboard"
                                    else t for t in accelerator.log_with]
        name = os.path.basename(os.path.normpath(cfg.output_dir)) or "hybrid_reid"  # the project in wandb, mlflow ...
        accelerator.init_trackers(name, config=tracker_config(cfg), init_kwargs={"wandb": {"dir": cfg.output_dir}})
    nan_steps = set(cfg.debug.nan_at_steps)
    max_norm = tc.clip_grad_norm if tc.clip_grad_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    device = accelerator.device

    metrics: Optional[Dict[str, object]] = None
    for epoch in range(progress.epoch, tc.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        good_batches = torch.zeros((), device=device)
        epoch_skipped = 0
        batches = iter(train_loader)
        bar = tqdm(range(steps_per_epoch * micro_per_step), disable=not accelerator.is_local_main_process,
                   desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False)
        for micro in bar:
            batch = send_to_device(next(batches), device, non_blocking=True)
            if micro % micro_per_step == 0:  # BatchNorm statistics as they were before this step
                buffers = [b.detach().clone() for b in model.buffers()]
                loss_finite = torch.ones((), dtype=torch.bool, device=device)
            with shards.shard(model, micro, progress.step) if shards else accelerator.accumulate(model):
                out = model(batch["images"], batch["cam_ids"], batch["view_ids"])
                losses = criterion(out, batch["pids"], epoch)
                if progress.step + 1 in nan_steps:
                    losses["total"] = losses["total"] * float("nan")
                # The guard decides at the optimizer step, from a device flag: no host sync per micro-step.
                # A non-finite loss is backpropagated as 0 (every rank does a backward, so DDP stays in step)
                # and the step is skipped below, before anything (scaler included) sees its gradients.
                finite = torch.isfinite(losses["total"].detach())
                loss_finite &= finite
                accelerator.backward(torch.where(finite, losses["total"], torch.zeros_like(losses["total"])))
                for k, v in losses.items():
                    sums[k] += torch.where(finite, v.detach().float(), torch.zeros((), device=device))
                good_batches += finite
            # (outside the context: Accelerate's no-op step and zero_grad of a non-final micro-step are skipped)
            if not (shards.is_last(micro) if shards else accelerator.sync_gradients):
                continue
            if shards:
                shards.reduce(model)
            reason = _guarded_clip(accelerator, model, loss_finite, max_norm)
            if reason is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            if reason is not None:
                with torch.no_grad():  # a skipped step leaves no trace, running statistics included
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                progress.skipped += 1
                progress.bad_run += 1
                epoch_skipped += 1
                _report_bad_step(accelerator, run_log, cfg, progress, epoch, reason, batch["pids"])
                continue
            progress.bad_run = 0
            scheduler.step()
            if progress.step % tc.log_every == 0:
                rec = {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
                rec["lr"] = optimizer.param_groups[0]["lr"]
                accelerator.log(rec, step=progress.step)
                run_log.write({"kind": "step", "epoch": epoch + 1, "step": progress.step, **rec})
                bar.set_postfix(loss=f"{rec['loss/total']:.3f}")
            _pause_if_asked(cfg, progress.step, main)
        n = good_batches.clamp(min=1)
        epoch_losses = {k: float(accelerator.reduce(v / n, reduction="mean")) for k, v in sums.items()}
        progress.epoch = epoch + 1
        record = {"kind": "epoch", "epoch": progress.epoch, "step": progress.step,
                  "lr": optimizer.param_groups[0]["lr"], "loss": epoch_losses.get("total", float("nan")),
                  **{f"loss/{k}": v for k, v in epoch_losses.items()}, "skipped_steps": epoch_skipped}
        if (tc.eval_every and progress.epoch % tc.eval_every == 0) or progress.epoch == tc.epochs:
            metrics = evaluator.run(model)
            record.update({k: v for k, v in metrics.items() if k in METRIC_KEYS})
        record["epoch_time_s"] = round(time.time() - t0, 3)
        logger.info("epoch %d/%d: loss %.4f%s%s", progress.epoch, tc.epochs, record["loss"],
                    f"  mAP {record['mAP']:.2f}  rank1 {record['rank1']:.2f}" if "mAP" in record else "",
                    f"  ({epoch_skipped} non-finite steps skipped)" if epoch_skipped else "")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=progress.step)
        run_log.write(record)
        save_checkpoint(accelerator, cfg.output_dir, f"{CHECKPOINT_PREFIX}{progress.epoch:03d}",
                        progress.state_dict(), tc.keep_checkpoints)

    if metrics is None:  # epochs == 0, or resumed from the last checkpoint
        metrics = evaluator.run(model)
    result: Dict[str, object] = {}
    if main:  # the output folder is a model folder: weights with metadata, config.yaml, then the card
        plain = _unwrap(accelerator, model)
        save_pretrained(plain, cfg.output_dir, cfg)
        result = report_metrics(cfg, data, accelerator, metrics, t_start, epoch=progress.epoch, steps=progress.step,
                                skipped_steps=progress.skipped, params=num_params)
        write_model_card(cfg.output_dir, cfg, plain, result, _command())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _command() -> List[str]:
    """The command line of this process, as a user would type it again."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "-m hybrid_reid.cli"
    return ["python", *argv] if argv and not os.path.basename(argv[0]).startswith("hybrid-reid") else argv


def _unwrap(accelerator: Accelerator, model: torch.nn.Module) -> ReIDModel:
    """The plain model behind DDP and ``torch.compile`` wrappers."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _guarded_clip(accelerator: Accelerator, model: torch.nn.Module, loss_finite: torch.Tensor,
                  max_norm: float) -> Optional[str]:
    """Clip the gradients of an optimizer step and say why the step must be skipped (None: take it).

    One host sync per optimizer step (two with an fp16 scaler): the loss flag and the gradient norm
    are decided together, on every process alike. With fp16 the loss is checked first, so the
    scaler never unscales gradients of a skipped step; an fp16 *overflow* stays the scaler's to
    skip, and counts as bad only once the scale is below 1.
    """
    scaler = accelerator.scaler
    if scaler is None:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        loss_ok, norm_ok = _all_processes(accelerator, torch.stack([loss_finite, torch.isfinite(norm).all()]))
        if not loss_ok:
            return "non-finite loss"
        return None if norm_ok else "non-finite gradient norm"
    if not _all_processes(accelerator, loss_finite)[0]:
        return "non-finite loss"
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if not _all_processes(accelerator, torch.isfinite(norm).all())[0] and scaler.get_scale() < 1.0:
        return "non-finite gradient norm"
    return None


def _report_bad_step(accelerator: Accelerator, run_log: RunLog, cfg: Config, progress: TrainProgress, epoch: int,
                     reason: str, pids: torch.Tensor) -> None:
    """Log a skipped step (its number and the batch's identities); stop the run after
    ``train.max_bad_steps`` in a row, with a checkpoint of the last good state."""
    ids = sorted({int(p) for p in pids.tolist()})
    logger.warning("step %d skipped (%s; no optimizer or scheduler update); identities in the batch: %s; "
                   "%d in a row, %d in the run", progress.step, reason, ids, progress.bad_run, progress.skipped)
    run_log.write({"kind": "skip", "epoch": epoch + 1, "step": progress.step, "reason": reason, "pids": ids,
                   "in_a_row": progress.bad_run})
    accelerator.log({"train/skipped_steps": progress.skipped}, step=progress.step)
    if progress.bad_run < cfg.train.max_bad_steps:
        return
    # the skipped steps changed nothing: the weights are those of the last good step
    path = save_checkpoint(accelerator, cfg.output_dir, f"stopped_step_{progress.step:06d}", progress.state_dict())
    accelerator.end_training()  # flush the trackers
    raise TrainingDiverged(
        f"stopping: {progress.bad_run} consecutive steps ({progress.step - progress.bad_run + 1}..{progress.step}) "
        f"had a non-finite loss or gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}). The last good "
        f"state is in {path} (run.py eval --checkpoint {path}). Try a lower optim.lr, train.clip_grad_norm > 0, "
        f"train.mixed_precision=bf16 instead of fp16, or check the data of the identities logged above.")


EVAL_METRICS = "eval_metrics.json"


def evaluate(cfg: Config, checkpoint: str, save_features_to: Optional[str] = None,
             out: Optional[str] = None) -> Dict[str, object]:
    """Evaluate a trained model (``model.safetensors`` or a checkpoint folder); writes ``out``
    (default ``OUTPUT_DIR/eval_metrics.json``; a training run's ``metrics.json`` is never replaced)
    and, with ``save_features_to`` (``.safetensors`` / ``.npz``), the ranked features."""
    t_start = time.time()
    out = out or os.path.join(cfg.output_dir, EVAL_METRICS)
    if os.path.basename(out) == "metrics.json" and os.path.exists(os.path.join(os.path.dirname(out) or ".",
                                                                               "config.yaml")):
        raise ValueError(f"--out {out} would replace a training run's metrics.json; write the evaluation elsewhere "
                         f"(default {EVAL_METRICS})")
    accelerator, data, cfg, model, evaluator = load_trained(cfg, checkpoint)
    metrics = evaluator.run(model)
    result: Dict[str, object] = {}
    if accelerator.is_main_process:
        params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        result = report_metrics(cfg, data, accelerator, metrics, t_start, path=out,
                                checkpoint=os.path.abspath(checkpoint), params=params)
        if save_features_to:
            save_features(save_features_to, evaluator.features, saved_meta(cfg, evaluator, checkpoint))
            logger.info("features -> %s", save_features_to)
    accelerator.wait_for_everyone()
    return result


def saved_meta(cfg: Config, evaluator: Evaluator, checkpoint: str) -> Dict[str, object]:
    """What ``run.py eval --features`` needs besides the feature sets to give the same numbers."""
    return {"checkpoint": os.path.abspath(checkpoint), "protocol": cfg.eval.protocol, "dataset": cfg.data.name,
            "modalities": list(cfg.data.modalities), "anchor_modality": cfg.data.anchor_modality,
            "eval": to_dict(cfg.eval), "ranked": {n: list(p) for n, p in evaluator.ranked.items()}}


def evaluate_saved(path: str, overrides: Sequence[str] = (), config: Optional[str] = None,
                   out: Optional[str] = None) -> Dict[str, object]:
    """The metrics of feature sets saved by ``run.py eval --save-features`` (no model, no images):
    the same numbers as the run that saved them, under its ``eval`` settings unless ``config`` /
    ``overrides`` change them (e.g. ``eval.rerank=true``). Writes ``out`` (default
    ``<features>.metrics.json``)."""
    from ..config.schema import config_from_dict
    from .evaluator import load_features, load_features_meta

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features {path}: no such file (write one with run.py eval --save-features)")
    features, meta = load_features(path), load_features_meta(path)
    if "ranked" not in meta or "eval" not in meta:
        raise ValueError(f"{path}: no ranking record in the file (saved by an older version?); save the features "
                         "again with run.py eval --save-features")
    base = {"data": {"name": meta.get("dataset", "rgbnt201"), "modalities": meta.get("modalities", ["rgb"]),
                     "anchor_modality": meta.get("anchor_modality", "rgb")}, "eval": meta["eval"]}
    if config:
        cfg = load_config(config, list(overrides))
    else:
        cfg = config_from_dict(base, list(overrides))
    evaluator = Evaluator.from_saved(cfg, features, meta["ranked"])
    metrics = evaluator.summarize()
    out = out or os.path.splitext(path)[0] + ".metrics.json"
    result = write_metrics(out, metrics, {"features": os.path.abspath(path), "dataset": cfg.data.name,
                                          "checkpoint": meta.get("checkpoint")})
    print(metrics_table(result), flush=True)
    return result


def load_trained(cfg: Config, checkpoint: str):
    """``(accelerator, data, resolved cfg, prepared model, evaluator)`` for a trained checkpoint."""
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=_cpu_only())
    with accelerator.main_process_first():
        data = load_data(cfg.data)
    if accelerator.is_main_process:
        logger.info("data %s:\n%s", cfg.data.name, data.summary_table())
    cfg = resolve_config(cfg, data)
    model = build_model(cfg.model, load_pretrained=False, modalities=data.modalities,
                        anchor=cfg.data.anchor_modality)
    evaluator = _evaluator(accelerator, cfg, data, model)  # bad eval.* settings fail before the weights load
    load_model_weights(model, checkpoint, inference=True)
    model = accelerator.prepare(model)
    return accelerator, data, cfg, model, evaluator
