"""Metrics: COCO evaluation (bbox/segm) with pycocotools."""
from vision.metrics.coco_eval import STAT_NAMES, CocoEvaluator, build_coco, evaluate_detections, summarize

__all__ = ["CocoEvaluator", "evaluate_detections", "build_coco", "summarize", "STAT_NAMES"]
