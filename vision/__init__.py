"""visionflow's library: models, ops, transforms, metrics, adversarial, explain.

Pure PyTorch/torchvision. Never imports ray or pipelines, so it works in a notebook,
a unit test or another orchestrator.
"""
