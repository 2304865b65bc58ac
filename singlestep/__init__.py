"""singlestep: a PyTorch training framework for studying and comparing optimizers."""

__version__ = "0.1.0"
