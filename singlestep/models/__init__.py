"""Models, one per file; importing this package registers them in ``MODELS``.

A model builder takes the dataset's :class:`~singlestep.data.base.DataMeta` first and its config
values keyword-only, and raises :class:`~singlestep.errors.IncompatibleError` when it cannot fit
the data.
"""

from singlestep.models import cnn, linear, mlp, tiny_lm  # noqa: F401
