"""Drawing model outputs with detectron2's Visualizer."""
import numpy as np
import torch
from detectron2.utils.visualizer import ColorMode, Visualizer
from torch.nn import functional as F


def draw_predictions(
    image_rgb: np.ndarray, predictions: dict, metadata, instance_score_threshold: float = 0.5
) -> np.ndarray:
    """Overlay one image's predictions, preferring panoptic, then instances, then semantic.

    Args:
        image_rgb: [H, W, 3] uint8 RGB.
        predictions: a model output dict ("panoptic_seg", "instances" and/or "sem_seg"; or a
            referring model's "ref_mask", drawn with its "sentence" when given).
        instance_score_threshold: instances below this score are not drawn.

    Returns:
        [H, W, 3] uint8 RGB drawing.
    """
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in predictions:
        panoptic_seg, segments_info = predictions["panoptic_seg"]
        drawing = visualizer.draw_panoptic_seg(panoptic_seg.to("cpu"), segments_info)
    elif "instances" in predictions:
        instances = predictions["instances"].to("cpu")
        drawing = visualizer.draw_instance_predictions(instances[instances.scores >= instance_score_threshold])
    elif "sem_seg" in predictions:
        drawing = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(torch.device("cpu")))
    elif "ref_mask" in predictions:
        mask = predictions["ref_mask"].to("cpu").numpy()
        drawing = visualizer.draw_binary_mask(mask, color="red", edge_color="yellow", text=predictions.get("sentence"))
    else:
        raise ValueError(f"nothing to draw: predictions have keys {sorted(predictions)}")
    return drawing.get_image()


def draw_cluster_assignments(
    image_rgb: np.ndarray, assignments: list[torch.Tensor], labels: list[str], alpha: float = 0.6
) -> np.ndarray:
    """The pixel-to-cluster assignment of each kMaX stage, side by side (the paper's Figure 4).

    Each panel blends the image with one colour per cluster (the same colour for a cluster in
    every panel, so a cluster can be followed as the k-means refines it) and is titled with its
    label.

    Args:
        image_rgb: [H, W, 3] uint8 RGB.
        assignments: per stage, an [h_i, w_i] map of cluster indices covering the image.
        labels: one title per stage.
        alpha: weight of the cluster colours.

    Returns:
        [H, len(assignments) * W, 3] uint8 RGB.
    """
    if len(assignments) != len(labels):
        raise ValueError(f"{len(assignments)} assignment maps but {len(labels)} labels")
    height, width = image_rgb.shape[:2]
    num_clusters = 1 + max(int(a.max()) for a in assignments)
    # A fixed palette: cluster k has the same colour in every panel and every image.
    palette = np.random.default_rng(0).integers(0, 256, size=(max(num_clusters, 1), 3)).astype(np.float32)
    panels = []
    for assignment, label in zip(assignments, labels):
        # Nearest neighbour keeps the stage's own resolution visible: coarse stages look blocky.
        full = F.interpolate(assignment[None, None].float().cpu(), size=(height, width), mode="nearest")[0, 0]
        colours = palette[full.long().numpy()]
        blended = ((1 - alpha) * image_rgb.astype(np.float32) + alpha * colours).astype(np.uint8)
        visualizer = Visualizer(blended)
        visualizer.draw_text(label, (4, 4), color="w", horizontal_alignment="left", font_size=max(8, height // 24))
        panels.append(visualizer.get_output().get_image())
    return np.concatenate(panels, axis=1)
