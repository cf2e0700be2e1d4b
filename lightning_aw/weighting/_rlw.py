"""Random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import GeneratorState
from lightning_aw.functional._baseline import _DISTRIBUTIONS, Distribution, rlw
from lightning_aw.weighting._base import Interval, LossWeighting


class RLW(LossWeighting, name="rlw", stateful=True, stochastic=True):
    r"""Random loss weighting: fresh random weights at every step.

    Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603.

    .. math::

        w = \operatorname{softmax}(\varepsilon), \qquad \varepsilon \sim \mathcal{N}(0, I_T),

    drawn anew every optimizer step (so the weights are constant within a gradient-accumulation
    window), or every ``frequency`` steps or epochs. The weights **sum to 1** (the paper's
    convention): with a learning rate tuned for the plain sum the update is about ``T`` times
    smaller. A baseline that adaptive methods should beat.

    Reproducible and identical on every DDP rank: the draws come from the callback's own CPU
    generator, seeded with ``seed`` on every rank (or, with ``seed=None``, with a seed drawn from
    rank 0's global torch generator and broadcast, so ``seed_everything`` makes it reproducible),
    then moved to the module's device (asynchronously, from pinned memory, on CUDA: no host
    synchronisation). The generator state is saved in checkpoints, so a resumed
    run draws the same weights as an uninterrupted one. The first weights are drawn at setup.

    Args:
        seed: seed of the weights' generator (default ``None``: from the global generator).
        distribution: ``"normal"`` (default, softmax of standard normal draws), ``"uniform"``
            (softmax of :math:`U(0,1)` draws) or ``"dirichlet"`` (flat Dirichlet), see
            :func:`~lightning_aw.functional.rlw`.
        interval: ``"step"`` (default, the paper) or ``"epoch"``.
        frequency: draw new weights every ``frequency`` optimizer steps or epochs.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import RLW
        >>> from lightning_aw.functional import rlw
        >>> trainer = pl.Trainer(callbacks=[RLW(seed=0)], max_epochs=5, logger=False)
        >>> w = rlw(3, torch.Generator().manual_seed(0))  # softmax of Gaussian draws
        >>> w
        tensor([0.8446, 0.1349, 0.0205])
        >>> float(w.sum())
        1.0
    """

    total: ClassVar[str | float | None] = 1
    _state_attrs = ("_weights", "_generator")

    def __init__(
        self,
        seed: int | None = None,
        distribution: Distribution = "normal",
        interval: Interval = "step",
        frequency: int = 1,
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Parameter `seed` should be an int >= 0 or None. Found {seed!r}.")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"Parameter `distribution` should be one of {list(_DISTRIBUTIONS)}. "
                f"Found {distribution!r}."
            )
        self.seed = seed
        self.distribution: Distribution = distribution
        self._generator = GeneratorState()
        self._weights = torch.ones(0)

    def hparams_repr(self) -> dict[str, Any]:
        return {"seed": self.seed, "distribution": self.distribution, **super().hparams_repr()}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._first_setup(pl_module):
            seed = self.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))  # rank 0's global generator...
                seed = trainer.strategy.broadcast(seed, src=0)  # ...for every rank
            self._generator.manual_seed(seed)
        super().setup(trainer, pl_module, stage)

    uses_window_means: ClassVar[bool] = False

    def init_state(self, num_tasks: int) -> None:
        self._weights = self._draw(num_tasks)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        self._weights = self._draw(self.num_tasks)

    def _draw(self, num_tasks: int) -> Tensor:
        w = rlw(num_tasks, self._generator.generator, distribution=self.distribution)
        if self._device.type == "cuda":  # an asynchronous copy: no host synchronisation
            return w.pin_memory().to(self._device, non_blocking=True)
        return w.to(self._device)
