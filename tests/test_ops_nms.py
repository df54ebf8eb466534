"""vision.ops: IoU, NMS, soft-NMS and matrix NMS against torchvision and slow references."""
import math

import pytest
import torch
import torchvision

from vision.ops import batched_nms, box_iou, generalized_box_iou, matrix_nms, nms, soft_nms


def random_boxes(n, seed=0, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat([xy, xy + wh], 1), torch.randperm(n, generator=g).float() / n  # scores without ties


def test_box_iou_and_giou_match_torchvision():
    a, _ = random_boxes(30, 1)
    b, _ = random_boxes(20, 2)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


def test_degenerate_and_empty_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 5, 5], [10, 10, 0, 0]], dtype=torch.float32)
    iou = box_iou(boxes, boxes)
    assert torch.isfinite(iou).all()
    assert iou[0, 0] == 1 and iou[1, 1] == 0 and iou[2, 2] == 0 and iou[0, 2] == 0
    assert torch.isfinite(generalized_box_iou(boxes, boxes)).all()
    # Degenerate boxes neither suppress nor get suppressed.
    keep = nms(boxes, torch.tensor([0.5, 0.9, 0.8]), 0.1)
    assert keep.tolist() == [1, 2, 0]
    empty = torch.zeros((0, 4))
    assert box_iou(empty, boxes).shape == (0, 3)
    assert nms(empty, torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    k, s = soft_nms(empty, torch.zeros(0))
    assert k.numel() == 0 and s.numel() == 0
    k, s = matrix_nms(empty, torch.zeros(0))
    assert k.numel() == 0


def test_labels_stay_apart_and_nan_scores_rank_last_whatever_the_coordinates():
    """torchvision's offset per label (label x (largest coordinate + 1)) does not separate labels whose
    boxes lie at negative coordinates; a NaN score sorted first and suppressed a scored box."""
    same = torch.tensor([[-30.0, -30, 5, 5], [-30, -30, 5, 5]])
    far = torch.tensor([[-100.0, -100, -10, -10], [-100, -100, -10, -10]])
    scores = torch.tensor([0.9, 0.8])
    for boxes in (same, far):
        assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
        assert batched_nms(boxes, scores, torch.tensor([1, 1]), 0.5).tolist() == [0]
    # Shifted data give the same result as the unshifted (IoU is shift-invariant).
    boxes, s = random_boxes(300, seed=8)
    labels = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(batched_nms(boxes - 1000, s, labels, 0.5), batched_nms(boxes, s, labels, 0.5))
    dup = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    nan_first = torch.tensor([float("nan"), 0.9, 0.5])
    assert nms(dup, nan_first, 0.5).tolist() == [1, 2]  # the scored duplicate wins; the NaN one is suppressed
    assert batched_nms(dup, nan_first, torch.tensor([0, 0, 0]), 0.5).tolist() == [1, 2]
    with pytest.raises(ValueError, match="sigma"):
        matrix_nms(dup, torch.tensor([0.9, 0.8, 0.5]), sigma=0.0)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_and_batched_nms_equal_torchvision(thr):
    boxes, scores = random_boxes(500, seed=3)
    labels = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    assert torch.equal(batched_nms(boxes, scores, labels, thr),
                       torchvision.ops.batched_nms(boxes, scores, labels, thr))


def test_threshold_means_suppress_if_greater():
    # IoU of these two is exactly 0.5.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=torch.float32)
    assert box_iou(boxes[:1], boxes[1:]).item() == 0.5
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_fp16_inputs():
    boxes, scores = random_boxes(200, seed=5)
    labels = torch.randint(0, 3, (200,))
    want = torchvision.ops.batched_nms(boxes.half().float(), scores.half().float(), labels, 0.5)
    got = batched_nms(boxes.half(), scores.half(), labels, 0.5)
    assert torch.equal(got, want)
    assert box_iou(boxes.half(), boxes.half()).dtype == torch.float32
    k, s = soft_nms(boxes.half(), scores.half())
    assert s.dtype == torch.float16 and len(k) > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="equal lengths"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(torch.zeros(3, 4), torch.zeros(3), 1.5)
    with pytest.raises(TypeError, match="labels must be an integer"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="method"):
        soft_nms(torch.zeros(3, 4), torch.zeros(3), method="cubic")


def slow_soft_nms(boxes, scores, method, iou_threshold, sigma, score_threshold):
    """The paper's algorithm, one box at a time in plain Python."""
    b = boxes.tolist()
    s = scores.tolist()
    remaining = list(range(len(b)))
    keep, kept = [], []

    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    remaining = [i for i in remaining if s[i] > score_threshold]
    while remaining:
        m = max(remaining, key=lambda i: s[i])
        keep.append(m)
        kept.append(s[m])
        remaining.remove(m)
        for i in remaining:
            o = iou(b[m], b[i])
            if method == "linear":
                s[i] *= (1 - o) if o > iou_threshold else 1.0
            else:
                s[i] *= math.exp(-(o * o) / sigma)
        remaining = [i for i in remaining if s[i] > score_threshold]
    return keep, kept


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_slow_reference(method):
    boxes, scores = random_boxes(120, seed=7, size=60.0)
    keep, new = soft_nms(boxes.double(), scores.double(), method=method, iou_threshold=0.3, sigma=0.5,
                         score_threshold=0.01)
    want_keep, want_scores = slow_soft_nms(boxes.double(), scores.double(), method, 0.3, 0.5, 0.01)
    assert keep.tolist() == want_keep
    torch.testing.assert_close(new, torch.tensor(want_scores, dtype=torch.float64))


def test_soft_nms_per_class_does_not_decay_other_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8])
    _, s = soft_nms(boxes, scores, torch.tensor([1, 2]), method="linear", iou_threshold=0.5)
    torch.testing.assert_close(s, scores)
    k, s = soft_nms(boxes, scores, torch.tensor([1, 1]), method="linear", iou_threshold=0.5)
    assert k.tolist() == [0]  # identical box decays to 0 and falls below score_threshold


def test_matrix_nms_decays_duplicates_and_keeps_separate_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.5], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.85, 0.7])
    keep, new = matrix_nms(boxes, scores, score_threshold=0.0)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.7, 0.85 * math.exp(-2.0 * 0.95 ** 2)]))
    keep, _ = matrix_nms(boxes, scores, score_threshold=0.2)
    assert keep.tolist() == [0, 2]
    # Per class: the near-duplicate of another class is untouched.
    keep, new = matrix_nms(boxes, scores, torch.tensor([1, 2, 1]), score_threshold=0.2)
    assert keep.tolist() == [0, 1, 2]
    # On masks: mask IoU replaces box IoU.
    masks = torch.zeros(3, 20, 20)
    masks[0, :10, :10] = 1
    masks[1, :10, :10] = 1
    masks[2, 10:, 10:] = 1
    keep, _ = matrix_nms(boxes, scores, masks=masks, score_threshold=0.2)
    assert keep.tolist() == [0, 2]


def test_matrix_nms_matches_explicit_formula():
    boxes, scores = random_boxes(40, seed=9, size=40.0)
    keep, new = matrix_nms(boxes, scores, kernel="gaussian", sigma=2.0, score_threshold=0.0)
    order = torch.argsort(scores, descending=True)
    iou = torchvision.ops.box_iou(boxes[order], boxes[order])
    want = []
    for j in range(40):
        d = 1.0
        for i in range(j):
            comp = max([iou[k, i].item() for k in range(i)], default=0.0)
            d = min(d, math.exp(-2.0 * (iou[i, j].item() ** 2 - comp ** 2)))
        want.append(scores[order[j]].item() * d)
    want = torch.tensor(want)
    torch.testing.assert_close(new, want[torch.argsort(want, descending=True)], rtol=1e-5, atol=1e-6)


def test_ops_any_device_follow_inputs():
    boxes, scores = random_boxes(50)
    assert nms(boxes, scores, 0.5).device == boxes.device
    if torch.cuda.is_available():
        keep = batched_nms(boxes.cuda(), scores.cuda(), torch.zeros(50, dtype=torch.int64).cuda(), 0.5)
        assert torch.equal(keep.cpu(), nms(boxes, scores, 0.5))


def test_batched_nms_answers_alike_when_many_groups_push_the_offsets_past_float32():
    """The Serve NMS stage groups boxes by (request, label): 256 requests of 80 classes give group ids near
    20,000, and torchvision's per-group offset puts 320-px boxes near 6e6, where float32 steps by half a
    pixel. Small boxes must still be suppressed as each group alone, in float64, suppresses them."""
    g = torch.Generator().manual_seed(0)
    n = 900  # at most 1,000 on the CPU: torchvision takes the offset path
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 3 + 1], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g) + 20_000
    kept = batched_nms(boxes, scores, labels, 0.3)
    expected = torch.cat([torch.nonzero(labels == k).flatten()[torchvision.ops.nms(boxes[labels == k].double(),
                                                                          scores[labels == k].double(), 0.3)]
                          for k in labels.unique()])
    expected = expected[scores[expected].argsort(descending=True)]
    assert torch.equal(kept, expected)
