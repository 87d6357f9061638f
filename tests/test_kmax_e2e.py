"""kMaX-DeepLab end to end through the public tools on the synthetic set, and learning on a
fixed batch."""
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image

import kmax_m2f
from kmax_m2f.data import build_mapper

from .conftest import REPO, default_dtype, run_tool

CONFIG = "tests/configs/tiny_kmax_panoptic.yaml"
METRICS = ["copypaste: Task: panoptic_seg", "copypaste: Task: segm", "copypaste: Task: sem_seg"]


def _train_net(datasets_dir, output_dir, opts=(), flags=()):
    args = ["tools/train_net.py", "--config-file", CONFIG, *flags, "OUTPUT_DIR", str(output_dir), *opts]
    result = run_tool(args, datasets_dir, REPO)
    return result.stdout + result.stderr


def test_train_eval_resume_demo_and_cluster_pictures(datasets_dir, tmp_path):
    log = _train_net(datasets_dir, tmp_path / "train")
    assert (tmp_path / "train" / "model_final.pth").is_file()
    assert all(metric in log for metric in METRICS), "an evaluator did not report"

    weights = str(tmp_path / "train" / "model_final.pth")
    log = _train_net(datasets_dir, tmp_path / "eval", ["MODEL.WEIGHTS", weights], flags=["--eval-only"])
    assert "Starting training" not in log
    assert all(metric in log for metric in METRICS)  # panoptic_seg: COCOPanopticEvaluator

    (tmp_path / "train" / "last_checkpoint").write_text("model_0000001.pth")
    log = _train_net(datasets_dir, tmp_path / "train", flags=["--resume"])
    assert "Starting training from iteration 2" in log

    image = datasets_dir / "synthetic" / "val" / "000001.jpg"
    out = tmp_path / "demo"
    run_tool(["tools/demo.py", "--config-file", CONFIG, "--input", str(image), "--output", str(out), "--show-clusters",
              "--opts", "MODEL.WEIGHTS", weights], datasets_dir, REPO)
    width, height = Image.open(image).size
    assert Image.open(out / "000001.png").size == (width, height)
    # One panel per kMaX layer (3 here) and the final prediction.
    assert Image.open(out / "000001_clusters.png").size == (4 * width, height)


def test_show_clusters_needs_a_kmax_model(datasets_dir, tmp_path):
    image = datasets_dir / "synthetic" / "val" / "000001.jpg"
    result = run_tool(["tools/demo.py", "--config-file", "tests/configs/tiny_maskformer_panoptic.yaml", "--input",
                       str(image), "--output", str(tmp_path), "--show-clusters", "--allow-random-weights"],
                      datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "--show-clusters needs a kMaX-DeepLab model" in result.stderr


def test_loss_falls_more_than_5x_on_a_fixed_batch(synthetic_prefix):
    """The final prediction's losses fall more than 5x; the instance-discrimination loss falls too.

    Not the plain total, by design of kMaX's losses: the PQ-style mask loss is weighted by the
    matched class probability, so it *rises* while the classes are learnt; the instance
    discrimination is a cross-entropy against soft targets (uniform over the sampled pixels of a
    mask), whose floor is their entropy; and on a 64-pixel image the stride-32 / 16 layers see
    2x2 / 4x4 maps, which cannot fit the stride-4 ground truth.
    """
    torch.manual_seed(0)
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), [
        "DATASETS.TRAIN", f"('{synthetic_prefix}_panoptic_train',)", "INPUT.RANDOM_FLIP", "none",
    ])
    model = build_model(cfg).train()
    mapper = build_mapper(cfg, is_train=True)
    mapper.copy_paste = False
    batch = [mapper(record) for record in DatasetCatalog.get(f"{synthetic_prefix}_panoptic_train")[:2]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    final = ("loss_ce", "loss_mask", "loss_dice", "loss_aux_semantic")
    finals, insdis = [], []
    for _ in range(150):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        finals.append(sum(losses[k].item() for k in final))
        insdis.append(losses["loss_pixel_insdis"].item())
    first, last = sum(finals[:3]) / 3, sum(finals[-3:]) / 3
    assert first / last > 5, f"the final losses fell from {first:.2f} to {last:.2f} only"
    assert sum(insdis[-3:]) < 0.9 * sum(insdis[:3])


def test_channels_last_layout_changes_no_loss_gradient_or_prediction(synthetic_prefix):
    """MODEL.KMAX_DEEPLAB.CHANNEL_LAST_FORMAT (on by default) only changes the memory layout."""
    torch.manual_seed(0)
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), [
        "DATASETS.TRAIN", f"('{synthetic_prefix}_panoptic_train',)", "INPUT.RANDOM_FLIP", "none",
    ])
    assert cfg.MODEL.KMAX_DEEPLAB.CHANNEL_LAST_FORMAT
    mapper = build_mapper(cfg, is_train=True)
    mapper.copy_paste = False
    batch = [mapper(record) for record in DatasetCatalog.get(f"{synthetic_prefix}_panoptic_train")[:2]]
    # float64, so that the two layouts' different summation orders stay far below the tolerances.
    with default_dtype(torch.float64):
        channels_last = build_model(cfg)
        nchw = build_model(cfg)
        nchw.load_state_dict(channels_last.state_dict())
        nchw.channel_last_format = False

        losses, gradients, predictions = [], [], []
        for model in (channels_last, nchw):
            model.train()
            torch.manual_seed(1)  # the same drop-path draws on both sides
            model_losses = model(batch)
            sum(model_losses.values()).backward()
            losses.append(model_losses)
            gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
            model.eval()
            with torch.no_grad():
                predictions.append(model([{"image": batch[0]["image"]}])[0])
    torch.testing.assert_close(losses[0], losses[1])
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    torch.testing.assert_close(gradients[0], gradients[1])
    torch.testing.assert_close(predictions[0]["sem_seg"], predictions[1]["sem_seg"])
    assert torch.equal(predictions[0]["panoptic_seg"][0], predictions[1]["panoptic_seg"][0])
