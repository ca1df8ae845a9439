"""The gradients of a quickstart model's first training step, written by rank 0 (run by
tests/test_reproducibility.py in one process and under ``torchrun --nproc_per_node 2``).

    python tests/scripts/first_step_grads.py OUT.pt DATA_ROOT
"""
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # this checkout

from hybrid_reid import build_model, load_config  # noqa: E402
from hybrid_reid.data import build_train_loader, load_data  # noqa: E402
from hybrid_reid.engine.train import _prepare_model, _transform, resolve_config  # noqa: E402
from hybrid_reid.losses import build_criterion  # noqa: E402

out_path, root = sys.argv[1], sys.argv[2]
cfg = load_config("configs/quickstart.yaml", [
    f"data.root={root}", "data.synth.ids=24", "data.synth.cams=3", "data.synth.images_per_cam=2",
    "data.synth.size=[64,32]", "data.batch_size=16", "data.num_instances=2"])
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
with accelerator.main_process_first():
    data = load_data(cfg.data)
cfg = resolve_config(cfg, data)
model = build_model(cfg.model, modalities=data.modalities)
loader = build_train_loader(data.train, data.modalities, _transform(cfg, model, True), cfg.data.batch_size,
                            cfg.data.num_instances, cfg.seed, 0, accelerator.num_processes, accelerator.process_index,
                            True)
criterion = build_criterion(cfg.loss, cfg.model.clip_consistency)
model = accelerator.prepare(_prepare_model(accelerator, cfg, model)).train()
batch = next(iter(loader))
out = model(batch["images"], batch["cam_ids"], batch["view_ids"])
accelerator.backward(criterion(out, batch["pids"], 0)["total"])
if accelerator.is_main_process:
    torch.save({n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None},
               out_path)
