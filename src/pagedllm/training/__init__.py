"""Supervised fine-tuning (LoRA or every weight) with a loss curve per data channel: `pagedllm train`."""

from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
