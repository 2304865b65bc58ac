"""Datasets, one per file; importing this package registers them in ``DATASETS``.

A dataset builder takes the training device first and its config values keyword-only, and returns
a :class:`~singlestep.data.base.DataBundle` whose splits are already on that device.
"""

from singlestep.data import cifar10, idx, shakespeare, synthetic, text  # noqa: F401
