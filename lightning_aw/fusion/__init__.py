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

TensorBoard: the callbacks write one custom-scalars layout (category ``lightning_aw fusion``,
chart ``fusion weights``). TensorBoard shows one layout per run, so inside a
:class:`~lightning_aw.MultiTaskModule`, which writes its own, only one of the two grouped charts
appears (every scalar is still logged).
"""

from lightning_aw.fusion._boosting import Boosting
from lightning_aw.fusion._callbacks import HedgeWeights, SAMMEWeights
from lightning_aw.fusion._ensemble import WeightedEnsemble

__all__ = ["Boosting", "HedgeWeights", "SAMMEWeights", "WeightedEnsemble"]
