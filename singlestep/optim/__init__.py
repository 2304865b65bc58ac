"""Optimizers, one per file, each a ``torch.optim.Optimizer`` subclass; importing registers them."""
