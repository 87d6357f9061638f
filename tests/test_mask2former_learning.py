"""Learning, not just running: Mask2Former overfits a fixed small batch of the synthetic set."""
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import kmax_m2f
from kmax_m2f.data import build_mapper

from .conftest import REPO


def test_loss_falls_more_than_5x_on_a_fixed_batch(synthetic_prefix):
    torch.manual_seed(0)
    cfg = kmax_m2f.build_config(str(REPO / "tests/configs/tiny_maskformer_panoptic.yaml"), [
        "DATASETS.TRAIN", f"('{synthetic_prefix}_panoptic_train',)", "INPUT.RANDOM_FLIP", "none",
    ])
    model = build_model(cfg).train()
    mapper = build_mapper(cfg, is_train=True)
    batch = [mapper(record) for record in DatasetCatalog.get(f"{synthetic_prefix}_panoptic_train")[:2]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        total = sum(model(batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first / last > 5, f"loss fell from {first:.2f} to {last:.2f} only"
