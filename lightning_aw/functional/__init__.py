"""Pure-torch maths of every weighting method: no Lightning, no state, no host synchronisation.

Each callback in :mod:`lightning_aw.weighting` gathers a statistic and calls its twin here, so
every method can be used and tested without a Trainer.
"""

from lightning_aw.functional._gradient import (
    aligned_mtl,
    aligned_mtl_from_gram,
    cagrad,
    cagrad_from_gram,
    db_mtl,
    graddrop,
    gradvac,
    gradvac_from_gram,
    gram_matrix,
    imtlg,
    imtlg_from_gram,
    mgda,
    mgda_from_gram,
    nash_mtl,
    nash_mtl_from_gram,
    pcgrad,
    pcgrad_from_gram,
    upgrad,
    upgrad_from_gram,
)
from lightning_aw.functional._loss import (
    dwa,
    equal,
    gradnorm_weight_grad,
    renormalize,
    uncertainty_loss,
    uncertainty_weights,
)

__all__ = [
    "aligned_mtl",
    "aligned_mtl_from_gram",
    "cagrad",
    "cagrad_from_gram",
    "db_mtl",
    "dwa",
    "equal",
    "graddrop",
    "gradnorm_weight_grad",
    "gradvac",
    "gradvac_from_gram",
    "gram_matrix",
    "imtlg",
    "imtlg_from_gram",
    "mgda",
    "mgda_from_gram",
    "nash_mtl",
    "nash_mtl_from_gram",
    "pcgrad",
    "pcgrad_from_gram",
    "renormalize",
    "uncertainty_loss",
    "uncertainty_weights",
    "upgrad",
    "upgrad_from_gram",
]
