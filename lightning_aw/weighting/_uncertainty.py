"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_aw.step import StepRecord
from lightning_aw.weighting._base import LossWeighting


class UncertaintyWeighting(
    LossWeighting, name="uncertainty", functional="uncertainty_weights", stateful=True
):
    r"""Learned task uncertainties weigh the losses.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115.

    With learnable :math:`s_i = \log\sigma_i^2` the loss is

    .. math::

        \mathcal{L} = \sum_i c_i e^{-s_i} L_i + \tfrac12 s_i,
        \qquad c_i = \tfrac12 \text{ (regression, default)},\ 1 \text{ (classification)}.

    The effective weight is :math:`c_i e^{-s_i}`; at the optimum of the regression form
    :math:`\sigma_i^2 = L_i`, so a well-specified Gaussian regression recovers its noise variance.
    The weights are not normalised (``total = None``).

    The :math:`s_i` are ``nn.Parameter``\ s attached to the module as ``loss_weighting.log_vars``:
    Lightning moves, casts, all-reduces (DDP) and checkpoints them; the default
    ``MultiTaskModule.configure_optimizers`` puts them in their own group with
    ``weight_decay=0`` and learning rate ``lr``. They are updated every optimizer step.

    Args:
        classification: task names that use the classification form (no ½ on the loss).
        init: initial :math:`s_i` (default 0, i.e. :math:`\sigma = 1`).
        lr: learning rate of the :math:`s_i` group (default: the model's). The paper uses 0.025.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import UncertaintyWeighting
        >>> from lightning_aw.functional import uncertainty_weights
        >>> method = UncertaintyWeighting(classification=["left", "right"])
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
        >>> log_vars = torch.log(torch.tensor([1.0, 4.0]))  # log sigma^2
        >>> uncertainty_weights(log_vars)  # regression: w = 1 / (2 sigma^2)
        tensor([0.5000, 0.1250])
    """

    total: ClassVar[str | float | None] = None

    def __init__(
        self, classification: Sequence[str] = (), init: float = 0.0, lr: float | None = None
    ) -> None:
        super().__init__()
        if isinstance(classification, str):
            classification = [classification]
        if lr is not None and not lr > 0:
            raise ValueError(f"Parameter `lr` should be > 0 or None. Found {lr!r}.")
        if not isinstance(init, (int, float)) or init != init:
            raise ValueError(f"Parameter `init` should be a finite number. Found {init!r}.")
        self.classification = list(classification)
        self.init = float(init)
        self.lr = lr
        self._flags: list[bool] = []

    def hparams_repr(self) -> dict[str, Any]:
        return {"classification": self.classification, "init": self.init, "lr": self.lr}

    def init_state(self, num_tasks: int) -> None:
        unknown = sorted(set(self.classification) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"UncertaintyWeighting(classification=...) names unknown tasks {unknown}; "
                f"the module's tasks are {self.tasks}."
            )
        self._flags = [t in self.classification for t in self.tasks]
        module = nn.Module()
        module.log_vars = nn.Parameter(torch.full((num_tasks,), self.init))
        # a buffer of the attached module: it follows the parameters' device, also at teardown
        coef = torch.tensor([1.0 if f else 0.5 for f in self._flags])
        module.register_buffer("coef", coef, persistent=False)
        self._register_module(module)

    @property
    def log_vars(self) -> Tensor:
        """The learned :math:`s_i = \\log\\sigma_i^2`, shape ``[T]``."""
        return self._learned_param("log_vars")

    @property
    def sigmas(self) -> dict[str, float]:
        """The learned :math:`\\sigma_i` by task name."""
        values = torch.exp(0.5 * self.log_vars.detach().float()).tolist()
        return dict(zip(self.tasks, values, strict=True))

    def weight_tensor(self) -> Tensor:
        return self.module.coef * torch.exp(-self.log_vars.detach().float())

    def combine(self, losses: Tensor, present: Tensor) -> Tensor:
        # inline form of `functional.uncertainty_loss` (same formula, no per-step validation)
        s = self._learned("log_vars").float()
        terms = self.module.coef * torch.exp(-s) * losses + 0.5 * s
        return (terms * present).sum()

    def combine_step(self, step: StepRecord) -> Tensor:
        if not all(step.present_list):
            return super().combine_step(step)
        s = self._learned("log_vars").float()
        return (self.module.coef * torch.exp(-s) * step.losses + 0.5 * s).sum()

    def log_items(self) -> dict[str, Tensor]:
        log_vars = self.log_vars.detach()
        return {f"uncertainty/log_var/{t}": log_vars[i] for i, t in enumerate(self.tasks)}
