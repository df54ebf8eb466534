"""Ray Train for every architecture: ``fit(TrainConfig)``, ``load_checkpoint(path)``, ``evaluate_checkpoint``."""
from pipelines.train.checkpoint import latest_checkpoint, load_checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.evaluate import evaluate_checkpoint
from pipelines.train.run_record import RunMismatch
from pipelines.train.trainer import TrainingDiverged, fit
from vision.models.weights import WeightsUnavailable

__all__ = ["RunMismatch", "TrainConfig", "TrainingDiverged", "WeightsUnavailable", "evaluate_checkpoint", "fit",
           "latest_checkpoint", "load_checkpoint"]
