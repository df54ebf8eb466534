"""The model zoo: ``create_model(name, num_classes, **kw)`` and ``list_models(task=None)``.

Importing this package registers every architecture; each family lives in its own module.
"""
from vision.models.registry import create_model, get_entry, list_models, model_task, register_model

# Registration side effects: one module per family.
from vision.models import classification  # noqa: F401,E402  torchvision classifiers
from vision.models import zfnet  # noqa: F401,E402
from vision.models import alexnet  # noqa: F401,E402  the 2012 two-tower AlexNet
from vision.models import localization  # noqa: F401,E402
from vision.models import detection  # noqa: F401,E402  sliding window, R-CNN, Faster/Mask R-CNN, SSD, YOLO
from vision.models import segmentation  # noqa: F401,E402  semantic segmentation

__all__ = ["create_model", "list_models", "model_task", "get_entry", "register_model"]
