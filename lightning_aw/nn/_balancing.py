"""Load balancing of gated experts: the published auxiliary losses (pure tensor functions, to add
as extra terms in ``task_losses``) and the auxiliary-loss-free bias (a callback)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import all_reduce_sum
from lightning_aw.nn._gate import Gate

__all__ = [
    "AuxFreeBalancing",
    "importance_loss",
    "router_z_loss",
    "switch_load_balancing_loss",
]


def _experts_last(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] < 1 or x.numel() == 0:
        raise ValueError(
            f"Parameter `{name}` should be a tensor [..., num_experts] with at least one row. "
            f"Found {getattr(x, 'shape', type(x).__name__)}."
        )
    return x.reshape(-1, x.shape[-1])


def importance_loss(gates: Tensor, weight: float = 0.1) -> Tensor:
    r"""The importance loss of Shazeer et al., "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, https://arxiv.org/abs/1701.06538:

    .. math::

        \mathrm{Importance}(X) = \sum_{x \in X} G(x),\qquad
        L_{\mathrm{importance}}(X) = w \cdot \mathrm{CV}(\mathrm{Importance}(X))^2,

    where :math:`G(x)` are the gate values ``[..., E]`` of the batch (after top-k) and
    :math:`\mathrm{CV} = \mathrm{std}/\mathrm{mean}` over the :math:`E` experts' importances.
    The std is the population one (divided by :math:`E`, not :math:`E - 1`): the paper defines
    the CV of "the set of importance values", and its authors' implementation (Tensor2Tensor's
    ``cv_squared``) divides the squared deviations by the number of experts. Ports that use
    ``Tensor.var()`` (unbiased) get :math:`E / (E - 1)` times this value. ``weight`` defaults to
    the paper's :math:`w_{importance} = 0.1`.
    Differentiable with respect to ``gates``. A uniform importance gives 0.

    With a block's gate ``g`` (``block.gates()[task]``) the differentiable gate values of its
    last forward are ``route(g.logits, g.top_k, g.balance_bias)``
    (:attr:`Gate.last <lightning_aw.nn.Gate.last>` is detached).

    Softmax gates have a positive mean importance (each row sums to 1); all-zero gates give NaN.

    Raises:
        ValueError: ``gates`` is not a non-empty ``[..., E]`` tensor.

    Example::

        >>> import torch
        >>> importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), weight=1.0)
        tensor(1.)
    """
    imp = _experts_last(gates, "gates").sum(0)
    mean = imp.mean()
    return weight * imp.var(unbiased=False) / mean.square()


def switch_load_balancing_loss(logits: Tensor, alpha: float = 0.01) -> Tensor:
    r"""The load-balancing loss of the Switch Transformer (Fedus, Zoph & Shazeer, "Switch
    Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity", JMLR
    2022, https://arxiv.org/abs/2101.03961), for router logits ``[..., N]`` (N experts):

    .. math::

        L = \alpha \cdot N \cdot \sum_{i=1}^{N} f_i\, P_i,\qquad
        f_i = \frac{1}{B}\sum_{x} \mathbb{1}[\arg\max p(x) = i],\qquad
        P_i = \frac{1}{B}\sum_{x} p_i(x),

    with :math:`p(x) = \mathrm{softmax}(\text{logits})` (the full router probabilities, before
    any top-k), :math:`f_i` the fraction of the :math:`B` tokens (rows) dispatched to expert
    :math:`i` by top-1 routing (not differentiable) and :math:`P_i` the mean router
    probability (differentiable). Uniform routing gives :math:`\alpha`; ``alpha`` defaults to
    the paper's :math:`10^{-2}`. Read the logits from :attr:`Gate.logits
    <lightning_aw.nn.Gate.logits>` after the block's forward.

    Example::

        >>> import torch
        >>> switch_load_balancing_loss(torch.zeros(4, 2), alpha=1.0)  # ties: top-1 is expert 0
        tensor(1.)
    """
    flat = _experts_last(logits, "logits")
    probs = torch.softmax(flat.float(), dim=-1)
    n = flat.shape[-1]
    f = F.one_hot(flat.argmax(-1), n).float().mean(0)
    return alpha * n * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor, weight: float = 1e-3) -> Tensor:
    r"""The router z-loss of Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse
    Expert Models", 2022, https://arxiv.org/abs/2202.08906, for router logits ``[..., N]``:

    .. math::

        L_z = w \cdot \frac{1}{B}\sum_{j=1}^{B}\Big(\log\sum_{i=1}^{N} e^{x_{ij}}\Big)^2

    over the :math:`B` rows; it keeps the logits small (numerically stable routing).
    ``weight`` defaults to the paper's :math:`c_z = 10^{-3}`.

    Example::

        >>> import torch
        >>> router_z_loss(torch.zeros(3, 4), weight=1.0)  # (log 4)^2
        tensor(1.9218)
    """
    flat = _experts_last(logits, "logits")
    return weight * torch.logsumexp(flat.float(), dim=-1).square().mean()


def balanced_gates(module: torch.nn.Module) -> list[tuple[str, Gate]]:
    """The gates of ``module`` with a balancing bias, by qualified name."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, Gate) and m.balance_bias is not None
    ]


class AuxFreeBalancing(Callback):
    r"""Auxiliary-loss-free load balancing of top-k gates (Wang, Gao, Zeng, Sun & Dai,
    "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", 2024,
    https://arxiv.org/abs/2408.15664; used in DeepSeek-V3, https://arxiv.org/abs/2412.19437).

    Every gate built with ``balance=True`` (:class:`~lightning_aw.nn.Gate`, and the blocks'
    ``balance`` argument) adds a per-expert bias :math:`b_i` to its logits for the top-k
    *selection* only; the gate values are the softmax over the selected experts' unbiased
    logits, so no gradient flows through :math:`b`. After each optimizer step this callback
    moves the bias toward a uniform load:

    .. math::

        b_i \leftarrow b_i + u \cdot \mathrm{sign}(\bar c - c_i),

    where :math:`c_i` is the number of selections of expert :math:`i` by the gate in the
    micro-batches (training forwards) since the last step and :math:`\bar c` their mean over
    the experts; :math:`u` is ``step_size`` (the paper's update rate, ``1e-3``).

    State and resume: the biases are buffers of the gates (``balance_bias``), so they are saved
    in the model's ``state_dict`` and a checkpoint resumes them exactly; the loads are reset at
    every optimizer step (nothing pending at a checkpoint). DDP: the loads of every gate are
    summed over the ranks in one all-reduce, so every rank applies the same update and the
    biases stay identical. One host synchronisation-free update per optimizer step (the sign is
    taken on the device).

    Args:
        step_size: the bias update rate :math:`u` (> 0).

    Raises:
        ValueError: ``step_size`` is not a positive number.
        MisconfigurationException: (at fit start) the module has no gate with ``balance=True``.

    Example::

        >>> from torch import nn
        >>> from lightning_aw.nn import MMoE
        >>> block = MMoE(4, lambda: nn.Linear(4, 2), num_experts=4, tasks=["a"], top_k=1,
        ...              balance=True)
        >>> AuxFreeBalancing(step_size=1e-3)
        AuxFreeBalancing(step_size=0.001)
    """

    def __init__(self, step_size: float = 1e-3) -> None:
        super().__init__()
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise ValueError(f"Parameter `step_size` should be a float > 0. Found {step_size!r}.")
        if not step_size > 0 or step_size == float("inf"):
            raise ValueError(f"Parameter `step_size` should be a float > 0. Found {step_size!r}.")
        self.step_size = float(step_size)
        self._gates: list[tuple[str, Gate]] = []
        self._step = -1
        #: the last update's load per gate (``name -> [E]``, summed over the ranks)
        self.last_load: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step_size={self.step_size})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_gates"] = []
        return state

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gates = balanced_gates(pl_module)
        if not self._gates:
            raise MisconfigurationException(
                f"{self!r} found no gate with a balancing bias in {type(pl_module).__name__}. "
                "Build the blocks with `balance=True` and `top_k` (e.g. "
                "`MMoE(..., top_k=1, balance=True)`)."
            )
        for _, gate in self._gates:
            gate.take_load()  # drop loads counted outside training (e.g. a sanity check)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._step or not self._gates:
            return  # no optimizer step (accumulating, or skipped): keep counting
        loads = all_reduce_sum(trainer, *[gate.take_load().float() for _, gate in self._gates])
        with torch.no_grad():
            for (name, gate), load in zip(self._gates, loads, strict=True):
                bias = gate.balance_bias
                if bias is None:  # the gate lost its bias after fit start
                    continue
                bias.add_(self.step_size * torch.sign(load.mean() - load).to(bias))
                self.last_load[name] = load.detach()
