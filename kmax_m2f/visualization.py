"""Drawing model outputs with detectron2's Visualizer."""
import numpy as np
import torch
from detectron2.utils.visualizer import ColorMode, Visualizer


def draw_predictions(
    image_rgb: np.ndarray, predictions: dict, metadata, instance_score_threshold: float = 0.5
) -> np.ndarray:
    """Overlay one image's predictions, preferring panoptic, then instances, then semantic.

    Args:
        image_rgb: [H, W, 3] uint8 RGB.
        predictions: a model output dict ("panoptic_seg", "instances" and/or "sem_seg").
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
    else:
        raise ValueError(f"nothing to draw: predictions have keys {sorted(predictions)}")
    return drawing.get_image()
