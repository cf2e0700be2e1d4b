"""ReLoBRaLo: relative loss balancing with random lookback (Bischof & Kraus, 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import GeneratorState
from lightning_aw.functional._loss_rates import _relobralo
from lightning_aw.weighting._base import Interval, LossWeighting


class ReLoBRaLo(LossWeighting, name="relobralo", stateful=True, stochastic=True):
    r"""ReLoBRaLo: relative loss balancing with random lookback.

    Bischof & Kraus, "Multi-Objective Loss Balancing for Physics-Informed Deep Learning", 2021,
    https://arxiv.org/abs/2110.09813, Sec. 3.

    With :math:`L(t)` the window-mean task losses of update :math:`t` (one optimizer step by
    default, as the paper updates every iteration; reduced over all DDP ranks, counting only the
    batches where the task is present) and :math:`L(0)` those of the first window:

    .. math::

        \lambda^{bal}_i(t, t') = T\,\operatorname{softmax}_i\Bigl(
            \frac{L_i(t)}{\tau\, L_i(t')}\Bigr), \qquad
        \lambda^{hist}_i(t) = \rho\,\lambda_i(t-1) + (1-\rho)\,\lambda^{bal}_i(t, 0),

        \lambda_i(t) = \alpha\,\lambda^{hist}_i(t) + (1-\alpha)\,\lambda^{bal}_i(t, t-1),
        \qquad \rho \sim \operatorname{Bernoulli}(\mathbb{E}[\rho]).

    The weights start at 1 and **sum to T** (every term does). :math:`\rho = 0` (probability
    :math:`1 - \mathbb{E}[\rho]`) "looks back": the history restarts from the balance against
    :math:`L(0)`. A task absent from a window keeps its last mean; its first mean seen is its
    :math:`L(0)`. See :func:`~lightning_aw.functional.relobralo` for the formula.

    Reproducible and identical on every DDP rank: :math:`\rho` is drawn from the callback's own
    CPU generator (no host synchronisation), seeded with ``seed`` on every rank (or, with
    ``seed=None``, with a seed drawn from rank 0's global torch generator and broadcast). The
    generator state, :math:`L(0)`, :math:`L(t-1)` and the weights are saved in checkpoints.

    What was verified, and where: the update above (the :math:`\rho\alpha`,
    :math:`(1-\rho)\alpha` and :math:`1-\alpha` terms; :math:`\lambda^{bal}` as ``T`` times
    a softmax of :math:`L_i(t) / (\tau L_i(t'))`, the temperature dividing the loss *ratio*;
    :math:`\rho = 1` with probability :math:`\mathbb{E}[\rho]`; :math:`L(0)` the first step's
    losses; one draw per step) matches the authors' public code (``rbischof/relative_balancing``,
    ``src/update_rules.py``, ``softadapt_rnd_lookback``). :math:`\alpha = 0.999` is that code's
    default too (its script defaults are :math:`\tau = 1` and :math:`\mathbb{E}[\rho] = 1`, no
    lookback, for its hyperparameter search). NVIDIA PhysicsNeMo's and neuraloperator's
    ``Relobralo`` default to :math:`\alpha = 0.95`, :math:`\mathbb{E}[\rho] = 0.99` (their
    ``beta``), :math:`\tau = 1`. Not verified (the paper's text could not be consulted):
    :math:`\mathbb{E}[\rho] = 0.9999` and :math:`\tau = 0.1` as the paper's chosen values; set
    them explicitly when results must match a reference. One known difference: the paper and
    the authors' code weigh step :math:`t`'s losses with :math:`\lambda(t)`, computed from
    those same losses; here, as for every window statistic of the library, :math:`\lambda(t)`
    is computed after step :math:`t` (from its window mean, identical on every DDP rank) and
    weighs step :math:`t+1`.

    Args:
        alpha: :math:`\alpha \in [0, 1]`, the weight of the history (default 0.999).
        expected_rho: :math:`\mathbb{E}[\rho] \in [0, 1]` (default 0.9999): 1 never looks back,
            0 always.
        temperature: :math:`\tau > 0` (default 0.1); large values give equal weights.
        seed: seed of the lookback's generator (default ``None``: from the global generator).
        interval: ``"step"`` (default, the paper) or ``"epoch"``.
        frequency: the window length in optimizer steps or epochs.

    Raises:
        ValueError: on parameters out of range; the module raises at the step a task loss is not
            positive (the ratios need positive losses).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_aw import ReLoBRaLo
        >>> from lightning_aw.functional import relobralo
        >>> method = ReLoBRaLo(seed=0)
        >>> method
        ReLoBRaLo(alpha=0.999, expected_rho=0.9999, temperature=0.1, seed=0, interval='step', frequency=1)
        >>> trainer = pl.Trainer(callbacks=[method], max_epochs=5, logger=False)
        >>> relobralo(torch.tensor([0.5, 1.0]), torch.ones(2), torch.ones(2), torch.ones(2), rho=0.0)
        tensor([0.0134, 1.9866])
    """  # noqa: E501

    total: ClassVar[str | float | None] = "T"
    requires_positive_losses: ClassVar[bool] = True
    loss_requirement: ClassVar[str] = (
        "positive task losses (it compares ratios L_i(t) / L_i(t-1) and L_i(t) / L_i(0))"
    )
    _state_attrs = ("_weights", "_initial", "_previous", "_known", "_generator")

    def __init__(
        self,
        alpha: float = 0.999,
        expected_rho: float = 0.9999,
        temperature: float = 0.1,
        seed: int | None = None,
        interval: Interval = "step",
        frequency: int = 1,
    ) -> None:
        super().__init__(interval=interval, frequency=frequency)
        for name, value in (("alpha", alpha), ("expected_rho", expected_rho)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Parameter `{name}` should be in [0, 1]. Found {value!r}.")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Parameter `{name}` should be in [0, 1]. Found {value!r}.")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 < temperature < float("inf")
        ):
            raise ValueError(f"Parameter `temperature` should be > 0. Found {temperature!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Parameter `seed` should be an int >= 0 or None. Found {seed!r}.")
        self.alpha = float(alpha)
        self.expected_rho = float(expected_rho)
        self.temperature = float(temperature)
        self.seed = seed
        self._generator = GeneratorState()
        self._weights = torch.ones(0)
        self._initial = torch.ones(0)
        self._previous = torch.ones(0)
        self._known = torch.zeros(0, dtype=torch.bool)

    def hparams_repr(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "expected_rho": self.expected_rho,
            "temperature": self.temperature,
            "seed": self.seed,
            **super().hparams_repr(),
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._first_setup(pl_module):
            seed = self.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))  # rank 0's global generator...
                seed = trainer.strategy.broadcast(seed, src=0)  # ...for every rank
            self._generator.manual_seed(seed)
        super().setup(trainer, pl_module, stage)

    def init_state(self, num_tasks: int) -> None:
        self._weights = torch.ones(num_tasks)
        self._initial = torch.ones(num_tasks)
        self._previous = torch.ones(num_tasks)
        self._known = torch.zeros(num_tasks, dtype=torch.bool)

    def weight_tensor(self) -> Tensor:
        return self._weights

    def update(self, trainer: pl.Trainer, window_mean: Tensor, window_present: Tensor) -> None:
        # a task absent from a window keeps its last mean; its first mean seen is its L(0)
        current = torch.where(window_present, window_mean, self._previous)
        first = window_present & ~self._known
        self._initial = torch.where(first, current, self._initial)
        previous = torch.where(self._known, self._previous, current)
        self._known = self._known | window_present
        if self._num_updates >= 1:
            # a 0-dim CPU tensor: multiplies device tensors without any host conversion
            u = torch.rand((), generator=self._generator.generator)
            rho = (u < self.expected_rho).to(torch.float32)
            # the twin :func:`~lightning_aw.functional.relobralo` without its checks (a host
            # synchronisation per update): the module checks every step's losses are positive
            self._weights = _relobralo(
                current,
                previous,
                self._initial,
                self._weights,
                rho,
                self.alpha,
                self.temperature,
            )
        self._previous = current
