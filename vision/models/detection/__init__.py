"""Detectors, one module per family; importing this package registers them all.

Every detector follows torchvision's convention (losses in training, output dicts in eval) and adds
``candidates(images) -> list[Detections]``: the outputs before NMS (see ``base``).
"""
from vision.models.detection.base import CandidateDetector, TorchvisionDetector
from vision.models.detection import sliding_window  # noqa: F401  OverFeat-style, fully convolutional
from vision.models.detection import rcnn  # noqa: F401  selective search + CNN on warped regions
from vision.models.detection import faster_rcnn  # noqa: F401  Faster R-CNN, Mask R-CNN
from vision.models.detection import ssd  # noqa: F401
from vision.models.detection import yolo  # noqa: F401  v1-style grid
from vision.models.detection import torchvision_zoo  # noqa: F401  torchvision's ResNet-50 / VGG-16 COCO detectors

__all__ = ["CandidateDetector", "TorchvisionDetector"]
