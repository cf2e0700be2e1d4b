"""WeightedEnsemble: fuse the outputs of several members with learned or callback-set weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["WeightedEnsemble"]

Combine = Literal["logits", "probabilities"]
WeightMode = Literal["learned", "fixed"]


class WeightedEnsemble(nn.Module):
    r"""Fuse the class scores of several members with one weight per member.

    The members are either whole models (``members`` maps names to modules; calling the
    ensemble calls each member on the same input) or heads of one model (``members`` is a list of
    names; call the ensemble with a dict ``{name: logits}`` the model computed).

    Fusion of the members' logits :math:`z_m` (classes on dim 1, as for
    :func:`torch.nn.functional.cross_entropy`) with weights :math:`w_m \ge 0`,
    :math:`\sum_m w_m = 1`:

    - ``combine="logits"``: :math:`\sum_m w_m z_m`, a weighted sum of logits (a product of the
      members' distributions, renormalised by the softmax of a following cross-entropy);
    - ``combine="probabilities"``: :math:`\log \sum_m w_m\, \mathrm{softmax}(z_m)`, the log of
      the weighted mixture of the members' probabilities (computed with a log-sum-exp). Its
      softmax is the mixture itself, so both :func:`~torch.nn.functional.nll_loss` and
      :func:`~torch.nn.functional.cross_entropy` on it give the mixture's negative
      log-likelihood.

    Weights:

    - ``weights="learned"``: :math:`w = \mathrm{softmax}(\theta)` with the parameter
      ``weight_logits`` :math:`\theta` (zeros: uniform at the start), trained by the loss on the
      fused output. Give it its own optimizer parameter group without weight decay (decay would
      pull the weights towards uniform): in a :class:`~lightning_aw.MultiTaskModule` return
      :meth:`fusion_parameters` from ``weighting_parameters()`` (it lands in the project's
      ``weighting`` group, never decayed; see :mod:`lightning_aw.optim`); in a plain
      ``LightningModule`` add ``{"params": ensemble.fusion_parameters(), "name": "weighting",
      "weight_decay": 0.0}`` to the optimizer's groups.
    - ``weights="fixed"``: the buffer ``fixed_weights`` (uniform at the start, or
      ``initial_weights``), set by :meth:`set_weights`, e.g. by
      :class:`~lightning_aw.fusion.SAMMEWeights` or :class:`~lightning_aw.fusion.HedgeWeights`.
      Being a buffer, it is saved in and restored from the module's checkpoint.

    Every call records the members' outputs, detached, in :attr:`last_member_outputs` (the
    weighting callbacks read them; see :mod:`lightning_aw.fusion`).

    Args:
        members: name -> module (whole models), or the member names (heads of one model).
        combine: ``"logits"`` or ``"probabilities"`` (see above).
        weights: ``"learned"`` or ``"fixed"``.
        initial_weights: optional non-negative starting weights (normalised to sum 1); for
            ``"learned"`` the logits start at their logarithm.

    Raises:
        ValueError: no member, duplicate names, an unknown ``combine``/``weights``, or bad
            ``initial_weights``.

    Example::

        >>> ens = WeightedEnsemble(["a", "b"], weights="fixed")
        >>> ens.set_weights(torch.tensor([0.75, 0.25]))
        >>> ens({"a": torch.tensor([[4.0, 0.0]]), "b": torch.tensor([[0.0, 4.0]])})
        tensor([[3., 1.]])
        >>> ens.weights
        {'a': 0.75, 'b': 0.25}
    """

    last_member_outputs: dict[str, Tensor] | None

    def __init__(
        self,
        members: Mapping[str, nn.Module] | Sequence[str],
        *,
        combine: Combine = "logits",
        weights: WeightMode = "learned",
        initial_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(members, Mapping):
            names = [str(n) for n in members]
            self.members: nn.ModuleDict | None = nn.ModuleDict(dict(members))
        elif isinstance(members, Sequence) and not isinstance(members, str):
            names = [str(n) for n in members]
            self.members = None
        else:
            raise ValueError(
                "Parameter `members` should be a dict of name -> module or a list of names. "
                f"Found {type(members).__name__}."
            )
        if not names:
            raise ValueError("Parameter `members` should name at least one member.")
        if len(set(names)) != len(names):
            raise ValueError(f"Parameter `members` has duplicate names: {names}.")
        if combine not in ("logits", "probabilities"):
            raise ValueError(
                f"Parameter `combine` should be 'logits' or 'probabilities'. Found {combine!r}."
            )
        if weights not in ("learned", "fixed"):
            raise ValueError(
                f"Parameter `weights` should be 'learned' or 'fixed'. Found {weights!r}."
            )
        self.names = tuple(names)
        self.combine: Combine = combine
        self.mode: WeightMode = weights
        start = torch.full((len(names),), 1.0 / len(names))
        if initial_weights is not None:
            start = self._checked(torch.as_tensor(initial_weights, dtype=torch.float32), "initial")
        if weights == "learned":
            self.weight_logits: nn.Parameter | None = nn.Parameter(torch.log(start))
        else:
            self.weight_logits = None
            self.register_buffer("fixed_weights", start.clone())
        self.last_member_outputs = None

    def _checked(self, w: Tensor, what: str) -> Tensor:
        if w.shape != (len(self.names),):
            raise ValueError(
                f"The {what} weights should have one entry per member {list(self.names)}. "
                f"Found shape {tuple(w.shape)}."
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError(
                f"The {what} weights should be finite, non-negative and not all zero. "
                f"Found {w.tolist()}."
            )
        return w / w.sum()

    def weight_tensor(self) -> Tensor:
        """The current weights ``[M]`` (sum 1): ``softmax(weight_logits)`` or the buffer.

        Example::

            >>> WeightedEnsemble(["a", "b"]).weight_tensor()
            tensor([0.5000, 0.5000], grad_fn=<SoftmaxBackward0>)
        """
        if self.weight_logits is not None:
            return torch.softmax(self.weight_logits, dim=0)
        return self.fixed_weights

    @property
    def weights(self) -> dict[str, float]:
        """The current weights by member name (host floats)."""
        return dict(zip(self.names, self.weight_tensor().detach().float().tolist(), strict=True))

    def set_weights(self, weights: Tensor) -> None:
        """Set the weights of a ``weights="fixed"`` ensemble (normalised to sum 1, in place).

        Raises:
            RuntimeError: on a ``weights="learned"`` ensemble (its optimizer owns the weights).
            ValueError: wrong length, negative, non-finite or all-zero weights.

        Example::

            >>> ens = WeightedEnsemble(["a", "b"], weights="fixed")
            >>> ens.set_weights(torch.tensor([1.0, 3.0])); ens.weights
            {'a': 0.25, 'b': 0.75}
        """
        if self.weight_logits is not None:
            raise RuntimeError(
                "This WeightedEnsemble learns its weights (weights='learned'); create it with "
                "weights='fixed' to have them set by a callback."
            )
        w = self._checked(weights.detach().to(torch.float64), "new")
        with torch.no_grad():
            self.fixed_weights.copy_(w.to(self.fixed_weights))

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The learnable fusion parameters (``[weight_logits]``, or ``[]`` for fixed weights).

        Example::

            >>> [p.shape for p in WeightedEnsemble(["a", "b", "c"]).fusion_parameters()]
            [torch.Size([3])]
        """
        return [] if self.weight_logits is None else [self.weight_logits]

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Call every member on the input (whole models), or take ``{name: logits}`` (heads),
        record the outputs in :attr:`last_member_outputs` and return :meth:`fuse`'s result."""
        if self.members is not None:
            outputs = {n: self.members[n](*args, **kwargs) for n in self.names}
        else:
            if len(args) != 1 or kwargs or not isinstance(args[0], Mapping):
                raise TypeError(
                    "This WeightedEnsemble fuses heads: call it with one dict {name: logits} "
                    f"for members {list(self.names)}."
                )
            outputs = dict(args[0])
        return self.fuse(outputs)

    def fuse(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """Fuse one output per member (see the class docstring) and record them, detached.

        Example::

            >>> ens = WeightedEnsemble(["a", "b"], combine="probabilities", weights="fixed")
            >>> out = ens.fuse({"a": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([[0.0, 9e9]])})
            >>> out.exp()
            tensor([[0.2500, 0.7500]])
        """
        if set(outputs) != set(self.names):
            raise ValueError(
                f"Expected one output per member {list(self.names)}; got {sorted(outputs)}."
            )
        z = [outputs[n] for n in self.names]
        shape = z[0].shape
        for n, t in zip(self.names, z, strict=True):
            if not isinstance(t, Tensor) or t.shape != shape:
                raise ValueError(
                    f"Member {n!r} returned "
                    f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}, member "
                    f"{self.names[0]!r} {tuple(shape)}: every member must return logits of one "
                    "shape."
                )
        if len(shape) < 2 and self.combine == "probabilities":
            raise ValueError(
                "combine='probabilities' needs logits with the classes on dim 1. Found shape "
                f"{tuple(shape)}."
            )
        self.last_member_outputs = {n: t.detach() for n, t in zip(self.names, z, strict=True)}
        stacked = torch.stack(z)  # [M, N, C, ...]
        w = self.weight_tensor().to(dtype=stacked.dtype, device=stacked.device)
        w = w.view(-1, *([1] * (stacked.dim() - 1)))
        if self.combine == "logits":
            return (w * stacked).sum(0)
        log_p = torch.log_softmax(stacked, dim=2)
        return torch.logsumexp(torch.log(w) + log_p, dim=0)

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, combine={self.combine!r}, weights={self.mode!r}"
