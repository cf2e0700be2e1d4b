"""Pure-torch maths of every weighting method: no Lightning, no state, no host synchronisation.

Each callback in :mod:`lightning_aw.weighting` gathers a statistic and calls its twin here, so
every method can be used and tested without a Trainer.
"""

from lightning_aw.functional._loss import (
    dwa,
    equal,
    gradnorm_weight_grad,
    renormalize,
    uncertainty_loss,
    uncertainty_weights,
)

__all__ = [
    "dwa",
    "equal",
    "gradnorm_weight_grad",
    "renormalize",
    "uncertainty_loss",
    "uncertainty_weights",
]
