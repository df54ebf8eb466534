"""What each layer learned: ZFNet's deconvnet (and guided backpropagation for other networks).

``visualize_model(model, images, layers, out_dir)`` writes one PNG grid per layer: for each of the
strongest feature maps, the projections of its top-9 activations beside the image patches behind them.
The pieces: ``top_activations``, ``project`` (one activation back to pixels), ``receptive_field_boxes``,
``backward_rule`` (deconvnet / guided / linear backward passes).
"""
from vision.explain.backward_rules import RULES, backward_rule
from vision.explain.deconvnet import (
    DECONVNET_MODELS,
    TopActivations,
    conv_layers,
    default_method,
    layer_activations,
    project,
    receptive_field_boxes,
    resolve_layer,
    top_activations,
)
from vision.explain.grid import layer_grid, save_layer_grid, visualize_model

__all__ = [
    "RULES", "backward_rule", "DECONVNET_MODELS", "TopActivations", "conv_layers", "default_method",
    "layer_activations", "project", "receptive_field_boxes", "resolve_layer", "top_activations",
    "layer_grid", "save_layer_grid", "visualize_model",
]
