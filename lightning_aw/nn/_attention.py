"""Soft sharing between task columns: cross-stitch units and MTAN task attention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_aw.nn._experts import _tasks
from lightning_aw.nn._gate import _check_positive

__all__ = ["CrossStitch", "TaskAttention"]


class CrossStitch(nn.Module):
    r"""A cross-stitch unit (Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for
    Multi-task Learning", CVPR 2016, https://arxiv.org/abs/1604.03539): between per-task columns,
    every task's next activation is a learned linear combination of all tasks' activations,

    .. math::

        \tilde x_t = \sum_{s} \alpha_{ts}\, x_s,

    with one :math:`T\times T` matrix :math:`\alpha` (or one per channel, ``num_channels=C``:
    :math:`\alpha_{c,t,s}` for the activations' dimension 1). It is initialised as in the paper:
    :math:`\alpha_{tt} = \alpha_S` (``alpha_self``) and :math:`\alpha_{ts} = \alpha_D`
    (``alpha_other``) for :math:`s \ne t`; the paper's best setting is :math:`(\alpha_S, \alpha_D)
    = (0.9, 0.1)`, near the identity. The rows are not normalised.

    :attr:`gate_weights` returns, per task, its row of :math:`\alpha` (``[T]``, or ``[C, T]``
    per channel): the weights it gives every task's column (in :attr:`tasks` order).

    Args:
        tasks: the task names (the keys of the input and output dicts).
        num_channels: ``None`` (one matrix) or the size of the activations' dimension 1 (one
            matrix per channel).
        alpha_self: the initial weight of a task's own column.
        alpha_other: the initial weight of every other column.

    Example::

        >>> import torch
        >>> unit = CrossStitch(["a", "b"])
        >>> out = unit({"a": torch.ones(2, 3), "b": torch.zeros(2, 3)})
        >>> out["a"][0, 0].item(), out["b"][0, 0].item()
        (0.8999999761581421, 0.10000000149011612)
    """

    def __init__(
        self,
        tasks: Sequence[str],
        num_channels: int | None = None,
        alpha_self: float = 0.9,
        alpha_other: float = 0.1,
    ) -> None:
        super().__init__()
        self.tasks = _tasks(tasks)
        if num_channels is not None:
            _check_positive("num_channels", num_channels)
        self.num_channels = num_channels
        n = len(self.tasks)
        init = torch.full((n, n), float(alpha_other))
        init.fill_diagonal_(float(alpha_self))
        if num_channels is not None:
            init = init.expand(num_channels, n, n).clone()
        self.alpha = nn.Parameter(init)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [t for t in self.tasks if t not in inputs]
        if missing:
            raise ValueError(f"CrossStitch needs an activation for every task; missing {missing}.")
        x = torch.stack([inputs[t] for t in self.tasks], dim=1)  # [B, T, C, ...]
        if self.num_channels is None:
            out = torch.einsum("ts,bs...->bt...", self.alpha.to(x.dtype), x)
        else:
            if x.ndim < 3 or x.shape[2] != self.num_channels:
                raise ValueError(
                    f"CrossStitch(num_channels={self.num_channels}) expects activations "
                    f"[B, {self.num_channels}, ...]; got {tuple(inputs[self.tasks[0]].shape)}."
                )
            out = torch.einsum("cts,bsc...->btc...", self.alpha.to(x.dtype), x)
        return {t: out[:, i] for i, t in enumerate(self.tasks)}

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        """Per task, its (detached) row of :math:`\\alpha` over the tasks' columns."""
        a = self.alpha.detach()
        return {t: a[..., i, :] for i, t in enumerate(self.tasks)}


class TaskAttention(nn.Module):
    r"""Per-task soft attention over a shared trunk's feature maps (MTAN: Liu, Johns & Davison,
    "End-to-End Multi-Task Learning with Attention", CVPR 2019, https://arxiv.org/abs/1803.10704).

    For every task :math:`t` a mask :math:`a_t = \sigma(\mathrm{BN}(\mathrm{conv}_{1\times1}(
    \mathrm{ReLU}(\mathrm{BN}(\mathrm{conv}_{1\times1}(u))))))` of the same shape as the shared
    features :math:`p` selects the task's features :math:`\hat a_t = a_t \odot p`. The input
    :math:`u` is the shared features themselves, or, with ``with_previous=True``, their
    concatenation with the task's attended features from the previous stage (the paper's
    :math:`[u^j; \hat a^{j-1}_t]`; resize those to ``p``'s size yourself). ``hidden`` is the
    width of the middle 1×1 convolution (default ``channels``).

    :attr:`gate_weights` returns, per task, the mean mask per channel over the last recorded
    batch and positions (``[C]``, each in (0, 1); masks do not sum to 1). The detached masks of
    the last forward are kept while :attr:`record` is true (no copy, no host synchronisation).

    Args:
        tasks: the task names.
        channels: the channels ``C`` of the shared features ``[B, C, H, W]``.
        hidden: the channels of the middle 1×1 convolution (default ``channels``).
        with_previous: the masks also read the task's previous attended features.

    Example::

        >>> import torch
        >>> att = TaskAttention(["seg", "depth"], channels=4)
        >>> out = att(torch.randn(2, 4, 5, 5))
        >>> tuple(out["seg"].shape), tuple(att.gate_weights["depth"].shape)
        ((2, 4, 5, 5), (4,))
    """

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        hidden: int | None = None,
        with_previous: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = _tasks(tasks)
        _check_positive("channels", channels)
        if hidden is not None:
            _check_positive("hidden", hidden)
        self.channels = channels
        self.with_previous = bool(with_previous)
        width = hidden or channels
        in_ch = 2 * channels if with_previous else channels
        self.mask = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(in_ch, width, 1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                    nn.Conv2d(width, channels, 1),
                    nn.BatchNorm2d(channels),
                    nn.Sigmoid(),
                )
                for t in self.tasks
            }
        )
        #: whether the forward keeps the detached masks in :attr:`last`
        self.record = True
        #: task -> the detached mask ``[B, C, H, W]`` of the last recorded forward
        self.last: dict[str, Tensor] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last"] = {}
        return state

    def forward(
        self, features: Tensor, previous: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"TaskAttention expects shared features [B, {self.channels}, H, W]; got shape "
                f"{tuple(features.shape)}."
            )
        if self.with_previous and previous is None:
            raise ValueError(
                "TaskAttention(with_previous=True) needs `previous`: each task's attended "
                "features of the previous stage, resized to the shared features' shape."
            )
        out: dict[str, Tensor] = {}
        last: dict[str, Tensor] = {}
        for t in self.tasks:
            u = features if not self.with_previous else torch.cat([features, previous[t]], 1)  # type: ignore[index]
            a = self.mask[t](u)
            if self.record:
                last[t] = a.detach()
            out[t] = a * features
        self.last = last
        return out

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        """Per task, the mean attention mask per channel over the last recorded batch."""
        return {t: a.float().mean(dim=(0, 2, 3)) for t, a in self.last.items()}

    def record_gates(self, on: bool) -> None:
        """Switch recording of the masks on or off."""
        self.record = bool(on)
        if not on:
            self.last = {}
