"""Every detector of the registry: losses in training, torchvision's output format in eval, and
NMS on ``candidates`` equal to the in-model results."""
import pytest
import torch

from vision.models import create_model, list_models
from vision.ops import batched_nms
from vision.ops import box_iou as box_iou_of
from vision.structures import Detections

K = 3
FEW = dict(rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20)
# Small settings so each model runs in seconds on CPU.
SMALL = {
    "fasterrcnn_resnet18_fpn": dict(min_size=64, max_size=64, candidates_per_img=100000, **FEW),
    "fasterrcnn_mobilenet_v3_fpn": dict(min_size=64, max_size=64, candidates_per_img=100000, **FEW),
    # Mask R-CNN at its default cap (100 candidates) with more before NMS (60 proposals x 3 classes): capped
    # before NMS, it returned fewer detections than torchvision's own
    "maskrcnn_resnet18_fpn": dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60),
    "ssdlite_mobilenet_v3": dict(candidates_per_img=100000, topk_candidates=20),
    "yolo_v1": dict(image_size=64),
    "sliding_window_resnet18": dict(scales=(1.0,)),
    "rcnn_resnet18": dict(max_proposals=20, rois_per_image=8),
    # torchvision's published detectors (vision/models/detection/torchvision_zoo.py), shrunk the same way
    "fasterrcnn_resnet50_fpn": dict(min_size=64, max_size=64, candidates_per_img=100000, **FEW),
    "fasterrcnn_resnet50_fpn_v2": dict(min_size=64, max_size=64, candidates_per_img=100000, **FEW),
    "maskrcnn_resnet50_fpn": dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60),
    # score_thresh 0: untrained scores (sigmoid ~0.01) would leave no candidate; RetinaNet also scores the
    # background column, which candidates must leave out (labels 1..K)
    "retinanet_resnet50_fpn": dict(min_size=64, max_size=64, candidates_per_img=100000, topk_candidates=20,
                                   score_thresh=0.0),
    "ssd300_vgg16": dict(candidates_per_img=100000, topk_candidates=20),
}
DETECTORS = list_models("detection") + ["maskrcnn_resnet18_fpn", "maskrcnn_resnet50_fpn"]


def images_and_targets(masks=False):
    torch.manual_seed(0)
    imgs = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[4.0, 30.0, 30.0, 60.0], [36.0, 4.0, 60.0, 28.0]]), "labels": torch.tensor([1, 3])}]
    if masks:
        for img, t in zip(imgs, targets):
            m = torch.zeros(len(t["boxes"]), 64, 64, dtype=torch.uint8)
            for k, b in enumerate(t["boxes"].long()):
                m[k, b[1]:b[3], b[0]:b[2]] = 1
            t["masks"] = m
    return imgs, targets


def test_registry_holds_every_detector():
    names = set(list_models("detection"))
    assert {"fasterrcnn_resnet18_fpn", "ssdlite_mobilenet_v3", "yolo_v1", "sliding_window_resnet18",
            "rcnn_resnet18"} <= names
    assert "maskrcnn_resnet18_fpn" in list_models("segmentation")
    assert {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "ssd300_vgg16"} <= names
    assert "maskrcnn_resnet50_fpn" in list_models("segmentation")


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_contract(name):
    model = create_model(name, num_classes=K, **SMALL.get(name, {}))
    has_masks = name.startswith("maskrcnn")
    imgs, targets = images_and_targets(masks=has_masks)
    model.train()
    losses = model(imgs, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    with torch.no_grad():
        outs = model(imgs)
    cands = model.candidates(imgs)
    assert len(outs) == len(cands) == 2
    for img, out, cand in zip(imgs, outs, cands):
        assert isinstance(cand, Detections)
        assert set(out) >= {"boxes", "scores", "labels"} and ("masks" in out) == has_masks
        if len(out["labels"]):
            assert out["labels"].min() >= 1 and out["labels"].max() <= K
            assert out["boxes"][:, 2].max() <= img.shape[-1] + 1e-3 and out["boxes"][:, 3].max() <= img.shape[-2] + 1e-3
            assert out["boxes"][:, :2].min() >= 0 and bool((out["boxes"][:, 2:] >= out["boxes"][:, :2]).all())
        # NMS as its own stage on the candidates gives the in-model result.
        keep = batched_nms(cand.boxes, cand.scores, cand.labels, model.nms_thresh)[: model.detections_per_img]
        torch.testing.assert_close(cand.boxes[keep], out["boxes"])
        torch.testing.assert_close(cand.scores[keep], out["scores"])
        assert torch.equal(cand.labels[keep], out["labels"])
        if has_masks:
            torch.testing.assert_close(cand.masks[keep], out["masks"])
    # Called on a model in training mode (a serving or benchmark path calls it directly): the same candidates,
    # the model's statistics and mode untouched (batch norm normalised with the batch and updated its own).
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for a, b in zip(cands, model.candidates(imgs)):
        torch.testing.assert_close(a.boxes, b.boxes) and torch.testing.assert_close(a.scores, b.scores)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rcnn_regresses_only_the_regions_that_overlap_their_object_by_0_6():
    """A region at IoU 0.55 is a positive for the classifier (>= 0.5) but not a regression target (R-CNN's
    appendix C): with it, the box loss is the ground-truth region's alone, over twice the sampled regions."""
    from vision.models.detection import rcnn

    model = create_model("rcnn_resnet18", num_classes=K, max_proposals=20, rois_per_image=32).eval()
    img = torch.rand(3, 64, 64)
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    near = torch.tensor([[10.0, 10.0, 40.0, 26.5]])  # IoU 16.5/30 = 0.55 with gt
    assert 0.5 < float(box_iou_of(near, gt)) < rcnn.REGRESSION_IOU
    target = [{"boxes": gt, "labels": torch.tensor([2])}]
    losses = {}
    for name, props in (("alone", torch.zeros(0, 4)), ("with_near", near)):
        model.proposals = lambda _img, props=props: props
        torch.manual_seed(0)
        losses[name] = model.compute_losses([img], target)
    # the ground truth joins the regions (IoU 1): one regression sample either way
    torch.testing.assert_close(losses["with_near"]["loss_box_reg"] * 2, losses["alone"]["loss_box_reg"])


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_fpn", "maskrcnn_resnet18_fpn", "ssdlite_mobilenet_v3"])
def test_candidates_path_equals_torchvision_postprocessing(name):
    """With no resize, NMS on our candidates equals torchvision's own in-model NMS."""
    model = create_model(name, num_classes=K, **SMALL[name]).eval()
    imgs, _ = images_and_targets()
    if name.startswith("ssd"):
        imgs = [torch.rand(3, 320, 320)]  # SSDlite resizes to 320 x 320
    with torch.no_grad():
        native = model.net(imgs)
        ours = model(imgs)
        assert len(native[0]) > 0
    for a, b in zip(native, ours):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
        if "masks" in a:
            torch.testing.assert_close(a["masks"][:, 0], b["masks"])


def test_faster_rcnn_reports_four_losses():
    model = create_model("fasterrcnn_resnet18_fpn", num_classes=K, **SMALL["fasterrcnn_resnet18_fpn"]).train()
    imgs, targets = images_and_targets()
    assert set(model(imgs, targets)) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


def test_bad_inputs_are_named():
    model = create_model("yolo_v1", num_classes=K, image_size=64)
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        model([torch.rand(1, 64, 64)])
    with pytest.raises(ValueError, match="one target dict per image"):
        model.train()([torch.rand(3, 64, 64)], None)
    with pytest.raises(ValueError, match="multiple of 16"):
        create_model("yolo_v1", num_classes=K, image_size=70)


def test_semantic_segmenters_predict_every_pixel():
    model = create_model("deeplabv3_mobilenet_v3", num_classes=K).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 80))["out"]
        assert out.shape == (2, K + 1, 64, 80)
        assert model([torch.rand(3, 64, 80)])["out"].shape == (1, K + 1, 64, 80)
    assert model.predict(torch.rand(1, 3, 64, 80)).max() <= K
    with pytest.raises(ValueError, match="share one size"):
        model([torch.rand(3, 64, 80), torch.rand(3, 32, 32)])
    assert "fcn_resnet50" in list_models("segmentation")


def test_ssdlite_runs_at_the_size_it_is_given():
    """``size`` sets the square SSDlite resizes to (torchvision fixes 320): the anchors follow it, boxes
    come back in the pixels of each image as given, and the network costs less on small images."""
    small = create_model("ssdlite_mobilenet_v3", 3, size=96).eval()
    assert small.net.transform.fixed_size == (96, 96)
    assert create_model("ssdlite_mobilenet_v3", 3).net.transform.fixed_size == (320, 320)
    images = [torch.rand(3, 96, 96), torch.rand(3, 60, 80)]
    out = small.candidates(images)
    for d, img in zip(out, images):
        h, w = img.shape[1:]
        assert len(d.boxes) > 0 and float(d.boxes[:, 2].max()) <= w and float(d.boxes[:, 3].max()) <= h
    # Its anchors (default boxes) are laid out for 96 px: 6 x 6 cells on the first map, not 20 x 20.
    feats = small.net.backbone(small.net.transform(images[:1])[0].tensors)
    assert next(iter(feats.values())).shape[-1] == 6
    small.train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}
    losses = small.compute_losses(images, [target, target])  # (batch norm on its 1 x 1 maps needs 2 images)
    assert set(losses) == {"bbox_regression", "classification"} and all(torch.isfinite(v) for v in losses.values())
    for bad in (16, 96.0, True):
        with pytest.raises(ValueError, match="size must be an integer"):
            create_model("ssdlite_mobilenet_v3", 3, size=bad)
