"""Optimizers, one per file, each a ``torch.optim.Optimizer`` subclass; importing registers them.

Every optimizer keeps torch.optim's shape (validate in ``__init__``, ``defaults``, lazy state in
``_init_group``, ``step`` under ``no_grad``, maths in a module-level function) and is written to be
traced by ``torch.compile``: tensor maths only, float32 0-dim ``step`` state on the parameter's
device, ``lr`` either a float or a 0-dim tensor. See docs/optimizers.md for the conventions table.
"""

from singlestep.optim import schedulers  # noqa: F401  (registers the lr schedules)
from singlestep.optim.adadelta import Adadelta
from singlestep.optim.adagrad import Adagrad
from singlestep.optim.adam import Adam
from singlestep.optim.adamw import AdamW
from singlestep.optim.build import build_optimizer
from singlestep.optim.lion import Lion
from singlestep.optim.muon import Muon
from singlestep.optim.rmsprop import RMSprop
from singlestep.optim.schedule_free_adamw import ScheduleFreeAdamW
from singlestep.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Lion",
    "Muon",
    "RMSprop",
    "ScheduleFreeAdamW",
    "build_optimizer",
]
