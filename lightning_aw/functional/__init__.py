"""Pure-torch maths of every weighting method: no Lightning, no state, no host synchronisation.

Each callback in :mod:`lightning_aw.weighting` and :mod:`lightning_aw.aggregation` gathers a
statistic and calls its twin here, so every method can be used and tested without a Trainer. A
twin is named after its method's registry name (:func:`lightning_aw.registry.list_methods`), e.g.
``imtl_g`` and ``imtl_g_from_gram`` for ``"imtl_g"``.

Layout, by concept (all names are re-exported here; the modules are private):

* loss-based: ``_baseline`` (equal, RLW, renormalisation), ``_loss_rates`` (DWA, SoftAdapt,
  ReLoBRaLo), ``_learned`` (uncertainty, GradNorm, IMTL-L, FAMO, Auto-Lambda),
  ``_scalarization`` (GLS, log loss, STCH),
  on the validation and masked numerics of ``_vectors``;
* gradient-based: ``_gram`` (the Gram matrix, checks, shared numerics), ``_qp`` (exact simplex
  and non-negative QP solvers), ``_simplex`` (MGDA, CAGrad), ``_projection`` (PCGrad, GradVac,
  UPGrad, DualProj), ``_balancing`` (IMTL-G, Nash-MTL, Aligned-MTL,
  FairGrad, ConFIG), ``_direction`` (DB-MTL, GradDrop), ``_adaptive`` (ExcessMTL, MoCo,
  learning-rate annealing: updates of state from per-task gradient statistics), ``_multibatch``
  (SDMGrad, MoDo: weights from the cross Gram matrix of two independent mini-batches);
* weights over several learners: ``_fusion`` (SAMME boosting, Hedge).
"""

from lightning_aw.functional._adaptive import excess_mtl, lr_annealing, moco, project_simplex
from lightning_aw.functional._balancing import (
    aligned_mtl,
    aligned_mtl_from_gram,
    con_fig,
    con_fig_from_gram,
    fairgrad,
    fairgrad_from_gram,
    imtl_g,
    imtl_g_from_gram,
    nash_mtl,
    nash_mtl_from_gram,
)
from lightning_aw.functional._baseline import equal, renormalize, rlw
from lightning_aw.functional._direction import db_mtl, graddrop
from lightning_aw.functional._fusion import hedge, samme, samme_alpha
from lightning_aw.functional._gram import gram_matrix
from lightning_aw.functional._learned import (
    auto_lambda_grad,
    famo_logit_grad,
    famo_loss,
    famo_weights,
    gradnorm_weight_grad,
    imtl_l_loss,
    uncertainty_loss,
    uncertainty_weights,
)
from lightning_aw.functional._loss_rates import dwa, relobralo, softadapt
from lightning_aw.functional._multibatch import modo, sdmgrad
from lightning_aw.functional._projection import (
    dual_proj,
    dual_proj_from_gram,
    gradvac,
    gradvac_from_gram,
    pcgrad,
    pcgrad_from_gram,
    upgrad,
    upgrad_from_gram,
)
from lightning_aw.functional._scalarization import (
    gls_loss,
    gls_weights,
    scale_invariant_loss,
    scale_invariant_weights,
    stch_loss,
    stch_weights,
)
from lightning_aw.functional._simplex import cagrad, cagrad_from_gram, mgda, mgda_from_gram

__all__ = [
    "aligned_mtl",
    "aligned_mtl_from_gram",
    "auto_lambda_grad",
    "cagrad",
    "cagrad_from_gram",
    "con_fig",
    "con_fig_from_gram",
    "db_mtl",
    "dual_proj",
    "dual_proj_from_gram",
    "dwa",
    "equal",
    "excess_mtl",
    "fairgrad",
    "fairgrad_from_gram",
    "famo_logit_grad",
    "famo_loss",
    "famo_weights",
    "gls_loss",
    "gls_weights",
    "graddrop",
    "gradnorm_weight_grad",
    "gradvac",
    "gradvac_from_gram",
    "gram_matrix",
    "hedge",
    "imtl_g",
    "imtl_g_from_gram",
    "imtl_l_loss",
    "lr_annealing",
    "mgda",
    "mgda_from_gram",
    "moco",
    "modo",
    "nash_mtl",
    "nash_mtl_from_gram",
    "pcgrad",
    "pcgrad_from_gram",
    "project_simplex",
    "relobralo",
    "renormalize",
    "rlw",
    "samme",
    "samme_alpha",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "sdmgrad",
    "softadapt",
    "stch_loss",
    "stch_weights",
    "uncertainty_loss",
    "uncertainty_weights",
    "upgrad",
    "upgrad_from_gram",
]
