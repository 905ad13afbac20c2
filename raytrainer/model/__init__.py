"""The decoder model, its attention backends, loss, activation checkpointing and FLOPs count."""

from raytrainer.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
