"""The localizer learns: on a few built-in shapes images it fits the boxes of their largest objects and
finds the cell of their centres, and its inference boxes stay inside the image."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou

from vision import transforms as T
from vision.data.synth import write_synth
from vision.models import create_model
from vision.models.localization import localization_loss


def _largest_objects(root, n: int):
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    labels = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    images, classes, boxes = [], [], []
    for info in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        if not anns:
            continue
        a = max(anns, key=lambda a: a["bbox"][2] * a["bbox"][3])
        x, y, w, h = a["bbox"]
        img, box = T.transform_localization(T.decode_image((root / "train" / info["file_name"]).read_bytes()),
                                            [x, y, x + w, y + h], labels[a["category_id"]], size=64, train=False)
        images.append(img.float() / 255)
        classes.append(labels[a["category_id"]])
        boxes.append(box)
    return torch.stack(images[:n]), torch.tensor(classes[:n]), torch.stack(boxes[:n])


@pytest.mark.slow  # (18 s) make test trains and evaluates a localizer in test_compare_runs.py
def test_localizer_fits_the_boxes_of_a_few_shapes_images(tmp_path):
    write_synth(tmp_path, images=40, size=96, seed=0)
    images, labels, boxes = _largest_objects(tmp_path, 16)
    torch.manual_seed(0)
    model = create_model("localizer", num_classes=int(labels.max()) + 1, backbone="resnet18")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(30):
        logits, pred, centre_loss = model(images, boxes)
        loss, _ = localization_loss(logits, pred, labels, boxes, (64, 64))
        loss = loss + centre_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        _, pred = model(images)
    iou = box_iou(pred, boxes).diagonal()
    assert iou.mean() > 0.5, f"mean IoU {iou.mean():.2f} on the training images after 30 steps"
    assert pred.min() >= 0 and pred.max() <= 64, "inference boxes are clipped to the image"
