"""vision/ops/roi_align.py: the sparse-product RoIAlign against torchvision's kernel, value and gradient."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TorchvisionPool
from torchvision.ops import roi_align

from vision.ops.roi_align import MultiScaleRoIAlign, roi_align_matrix, sparse_matrix

LEVELS = ["0", "1", "2", "3"]


def pyramid(images=3, size=448, channels=8, seed=0):
    """FPN-like features: levels 0-3 at strides 4-32 and an extra 'pool' level the pools must ignore."""
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict((name, torch.randn(images, channels, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g))
                        for i, name in enumerate(LEVELS))
    feats["pool"] = torch.randn(images, channels, 1, 1, generator=g)
    return feats


def hostile_boxes(n, size=448, seed=0):
    """Boxes inside, across the border, wholly outside, thinner than a feature pixel, and image-sized."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size + 40) - 30
    wh = torch.rand(n, 2, generator=g) * size * 0.8 + 0.05
    boxes = torch.cat([xy, xy + wh], 1)
    extra = torch.tensor([[0.0, 0.0, size, size], [10.0, 10.0, 10.3, 10.2], [-80.0, -80.0, -60.0, -50.0],
                          [size - 1.0, size - 1.0, size + 50.0, size + 70.0], [40.0, 5.0, 41.0, 90.0]])
    return torch.cat([boxes, extra])


def both(pool_args, feats, boxes, shapes):
    """Outputs and feature gradients of visionflow's pool and torchvision's on the same inputs."""
    results = []
    for cls in (MultiScaleRoIAlign, TorchvisionPool):
        x = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in feats.items())
        out = cls(*pool_args)(x, boxes, shapes)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a gradient that is not uniform
        grads = torch.autograd.grad((out * weights).sum(), [x[k] for k in LEVELS], allow_unused=True,
                                    materialize_grads=True)
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("output_size, sampling_ratio", [(7, 2), (14, 2), (5, 3), ((4, 6), 1)])
def test_multiscale_pool_matches_torchvision_in_value_and_gradient(output_size, sampling_ratio):
    feats = pyramid()
    boxes = [hostile_boxes(40, seed=1), hostile_boxes(25, seed=2), hostile_boxes(3, seed=3)]
    shapes = [(448, 448)] * 3
    (ours, our_grads), (ref, ref_grads) = both((LEVELS, output_size, sampling_ratio), feats, boxes, shapes)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in our_grads)  # RoIs reached every level (FPN's rule: by their size)


def test_images_without_boxes_and_no_boxes_at_all():
    feats = pyramid()
    shapes = [(448, 448)] * 3
    boxes = [hostile_boxes(10), torch.zeros((0, 4)), hostile_boxes(4, seed=5)]
    (ours, _), (ref, _) = both((LEVELS, 7, 2), feats, boxes, shapes)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    x = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in feats.items())
    out = MultiScaleRoIAlign(LEVELS, 7, 2)(x, [torch.zeros((0, 4))] * 3, shapes)
    assert out.shape == (0, 8, 7, 7)


def test_a_box_with_nan_or_huge_coordinates_reads_nothing_and_stays_inside_the_matrix():
    """A diverging detector's box: floor() of NaN as an integer made a column index of -9e18, which the
    sparse kernels read without a check."""
    rois = torch.tensor([[0, float("nan"), 2, 8, 8], [0, 1e30, 2, 8, 8], [0, 1, 1, 6, 6]])
    rows, cols, vals, shape = roi_align_matrix([(1, 8, 8)], [1.0], rois, torch.zeros(3, dtype=torch.long), (2, 2), 2)
    assert 0 <= int(cols.min()) and int(cols.max()) < shape[1] and bool(torch.isfinite(vals).all())
    feat = torch.randn(1, 8 * 8, requires_grad=True)
    out = (sparse_matrix(rows, cols, vals, shape) @ feat.view(-1, 1)).view(3, 4)
    assert torch.equal(out[:2], torch.zeros(2, 4))  # the two bad boxes read nothing
    ref = roi_align(feat.detach().view(1, 1, 8, 8), rois[2:], (2, 2), 1.0, 2).flatten()
    torch.testing.assert_close(out[2].detach(), ref)  # a good box beside them is unchanged
    out.sum().backward()
    assert torch.isfinite(feat.grad).all()


def test_one_level_pool_and_torchvision_path_where_no_gradient_flows():
    feats = OrderedDict(feat=torch.randn(2, 4, 20, 20))
    boxes = [hostile_boxes(12, size=80), hostile_boxes(6, size=80, seed=4)]
    (ours, g_ours), (ref, g_ref) = _one_level(feats, boxes)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)
    # No gradient wanted (evaluation): the module is torchvision's own, bit for bit.
    with torch.no_grad():
        a = MultiScaleRoIAlign(["feat"], 7, 2)(feats, boxes, [(80, 80)] * 2)
        b = TorchvisionPool(["feat"], 7, 2)(feats, boxes, [(80, 80)] * 2)
    assert torch.equal(a, b)


def test_half_precision_on_the_cpu_runs_torchvision_kernel():
    feats = OrderedDict(feat=torch.randn(1, 4, 16, 16, dtype=torch.float16, requires_grad=True))
    boxes = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 4.0, 60.0, 20.0]], dtype=torch.float16)]
    out = MultiScaleRoIAlign(["feat"], 3, 2)(feats, boxes, [(64, 64)])  # no sparse CPU product in float16
    out.float().sum().backward()
    assert out.dtype == torch.float16 and feats["feat"].grad is not None
    torch.testing.assert_close(out, TorchvisionPool(["feat"], 3, 2)(feats, boxes, [(64, 64)]))


def _one_level(feats, boxes):
    out = []
    for cls in (MultiScaleRoIAlign, TorchvisionPool):
        x = feats["feat"].clone().requires_grad_(True)
        y = cls(["feat"], 7, 2)(OrderedDict(feat=x), boxes, [(80, 80)] * 2)
        (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x])
        out.append((y.detach(), g))
    return out


def test_matrix_is_torchvision_roi_align_on_one_level():
    x = torch.randn(2, 3, 12, 16, requires_grad=True)
    rois = torch.cat([torch.tensor([[0.0], [1.0]]).repeat(8, 1), hostile_boxes(11, size=64)], 1)
    rows, cols, vals, (n_rows, n_cols) = roi_align_matrix([(2, 12, 16)], [0.25], rois.detach(),
                                                          torch.zeros(16, dtype=torch.long), (3, 5), 2)
    assert n_cols == 2 * 12 * 16 and n_rows == 16 * 3 * 5 and rows.numel() == n_rows * 16
    m = sparse_matrix(rows, cols, vals, (n_rows, n_cols))
    assert torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape,
                                   check_invariants=True).shape == m.shape  # a valid CSR: torch checks it
    ours = torch.sparse.mm(m, x.permute(0, 2, 3, 1).reshape(-1, 3))
    ours = ours.view(16, 3, 5, 3).permute(0, 3, 1, 2)
    ref = roi_align(x, rois, (3, 5), 0.25, 2, aligned=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               atol=1e-5, rtol=1e-4)


def test_rcnn_builders_use_the_pools_and_keep_their_checkpoint_keys():
    from vision.models.registry import create_model

    for arch in ("fasterrcnn_resnet18_fpn", "maskrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v3_fpn"):
        net = create_model(arch, 3, min_size=64, max_size=64).net
        assert isinstance(net.roi_heads.box_roi_pool, MultiScaleRoIAlign)
        if arch.startswith("maskrcnn"):
            assert isinstance(net.roi_heads.mask_roi_pool, MultiScaleRoIAlign)
        stock = create_model(arch, 3, min_size=64, max_size=64, box_roi_pool=TorchvisionPool(LEVELS, 7, 2)).net
        assert net.state_dict().keys() == stock.state_dict().keys()
        stock.load_state_dict(net.state_dict())  # a checkpoint from either loads into the other
