"""Ray Train for every architecture: ``fit(TrainConfig)``, ``load_checkpoint(path)``, ``evaluate_checkpoint``."""
from pipelines.train.checkpoint import latest_checkpoint, load_checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.evaluate import evaluate_checkpoint
from pipelines.train.trainer import fit

__all__ = ["TrainConfig", "evaluate_checkpoint", "fit", "latest_checkpoint", "load_checkpoint"]
