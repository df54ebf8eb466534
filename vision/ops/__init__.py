"""Box ops: IoU, generalized IoU, hard NMS (torchvision kernels, any device), soft-NMS, matrix NMS; RoIAlign
with a sparse-product CPU backward pass (`vision.ops.roi_align`).

Boxes are (N, 4) xyxy in pixels; "suppress if IoU > iou_threshold", as torchvision.
"""
from vision.ops.boxes import box_area, box_iou, clip_boxes, generalized_box_iou
from vision.ops.matrix_nms import mask_iou, matrix_nms
from vision.ops.nms import batched_nms, nms
from vision.ops.soft_nms import soft_nms

__all__ = ["box_iou", "generalized_box_iou", "box_area", "clip_boxes", "nms", "batched_nms",
           "soft_nms", "matrix_nms", "mask_iou"]
