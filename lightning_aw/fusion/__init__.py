"""Adaptive fusion and boosting: weights over several learners, updated from their errors.

- :class:`WeightedEnsemble`: an ``nn.Module`` fusing its members' logits (weighted sum) or
  probabilities (log of the weighted mixture), with learned weights or weights set by a callback;
- :class:`SAMMEWeights` (after each validation epoch, SAMME's ``α`` of each member's validation
  error) and :class:`HedgeWeights` (after each training batch, Hedge on the members' losses): the
  callbacks that set them, logged as ``fusion/<member>``;
- :class:`Boosting`: discrete SAMME boosting of LightningModules, one Trainer per round.

The maths are :func:`lightning_aw.functional.samme`, :func:`~lightning_aw.functional.samme_alpha`
and :func:`~lightning_aw.functional.hedge`.

Protocol between a module and the callbacks: the LightningModule holds one
:class:`WeightedEnsemble` created with ``weights="fixed"`` and calls it on the batch in
``training_step`` (Hedge) or ``validation_step`` (SAMME); each call records the members' outputs
(detached) in ``ensemble.last_member_outputs``, and the callback reads them with the batch's
targets (``targets(batch)``, default ``batch[1]``) in the batch-end hook.

TensorBoard: the callbacks draw the weights in one custom-scalars chart, ``fusion weights``.
TensorBoard reads one layout per run: in a plain LightningModule the callbacks write it (category
``lightning_aw fusion``); a :class:`~lightning_aw.MultiTaskModule` adds the chart to its own
layout (category ``lightning_aw``, next to the task losses and weights).
"""

from lightning_aw.fusion._boosting import Boosting
from lightning_aw.fusion._callbacks import HedgeWeights, SAMMEWeights
from lightning_aw.fusion._ensemble import WeightedEnsemble

__all__ = ["Boosting", "HedgeWeights", "SAMMEWeights", "WeightedEnsemble"]
