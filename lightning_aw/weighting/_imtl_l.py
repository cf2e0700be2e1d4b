"""IMTL-L: learned loss scales (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_aw.functional import imtl_l_loss
from lightning_aw.step import StepRecord
from lightning_aw.weighting._positive import PositiveLossWeighting


class IMTLL(PositiveLossWeighting, name="imtl_l", functional="imtl_l_loss", stateful=True):
    r"""IMTL-L: learn one scale per task so that every scaled loss stays near 1.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr (the loss-balance part, IMTL-L).

    With learnable :math:`s_i` (init 0):

    .. math::

        \mathcal{L} = \sum_i \bigl(e^{s_i} L_i - s_i\bigr), \qquad w_i = e^{s_i}.

    Minimising over :math:`s_i` gives :math:`e^{s_i} = 1/L_i`: at the optimum the scaled losses
    all equal 1 and the network's update is that of :class:`ScaleInvariant`
    (:math:`\sum_i \log L_i`). The weights are not normalised (``total = None``).

    The :math:`s_i` are ``nn.Parameter``\ s attached to the module as
    ``loss_weighting.log_scales``: Lightning moves, casts, all-reduces (DDP) and checkpoints them;
    the default ``MultiTaskModule.configure_optimizers`` puts them in their own group with
    ``weight_decay=0`` and learning rate ``lr``. They are updated every optimizer step, by the
    same optimizer as the network.

    Needs positive losses (otherwise :math:`s_i` has no minimum and diverges):
    :class:`~lightning_aw.MultiTaskModule` raises a ``ValueError`` naming the task at the step a
    loss reaches 0.

    Args:
        init: initial :math:`s_i` (default 0: weights 1, the plain sum).
        lr: learning rate of the :math:`s_i` group (default: the model's).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import IMTLL
        >>> from lightning_aw.functional import imtl_l_loss
        >>> trainer = pl.Trainer(callbacks=[IMTLL()], max_epochs=5, logger=False)
        >>> imtl_l_loss(torch.tensor([2.0, 0.5]), log_scales=torch.zeros(2))  # s = 0: the plain sum
        tensor(2.5000)
    """

    total: ClassVar[str | float | None] = None

    def __init__(self, init: float = 0.0, lr: float | None = None) -> None:
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not abs(init) < 1e30:
            raise ValueError(f"Parameter `init` should be a finite number. Found {init!r}.")
        number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        if lr is not None and not (number and 0 < lr < float("inf")):
            raise ValueError(f"Parameter `lr` should be > 0 or None. Found {lr!r}.")
        self.init = float(init)
        self.lr = lr

    def hparams_repr(self) -> dict[str, Any]:
        return {"init": self.init, "lr": self.lr}

    def init_state(self, num_tasks: int) -> None:
        super().init_state(num_tasks)
        module = nn.Module()
        module.log_scales = nn.Parameter(torch.full((num_tasks,), self.init))
        self._register_module(module)

    @property
    def log_scales(self) -> Tensor:
        """The learned :math:`s_i`, shape ``[T]``."""
        return self._learned_param("log_scales")

    def weight_tensor(self) -> Tensor:
        return torch.exp(self.log_scales.detach())

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        usable = present
        return imtl_l_loss(losses, self._learned("log_scales").float(), usable)

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        s = self._learned("log_scales").float()
        return (torch.exp(s) * step.losses - s).sum()

    def log_items(self) -> dict[str, Tensor]:
        s = self.log_scales.detach()
        return {f"imtl_l/log_scale/{t}": s[i] for i, t in enumerate(self.tasks)}
