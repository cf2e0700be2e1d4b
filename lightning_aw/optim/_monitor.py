r"""Effective per-parameter step sizes of adaptive optimizers, and a callback that logs them.

An adaptive optimizer moves parameter :math:`\theta_j` by :math:`\eta_j \cdot u_j`, where
:math:`u_j` is a gradient statistic (the first moment :math:`m_j`, or the gradient) and
:math:`\eta_j` is a per-parameter *effective step size* built from the gradient history. These
are the optimizer's own adaptive weights; :func:`param_step_size` reads them from the state (the
state after step :math:`t`, so :math:`\eta` is the factor of the step just taken, except for
Adadelta, see below):

========  ==================================================================================
rule      :math:`\eta` (``lr`` may be scheduled; :math:`t` = the parameter's own step count)
========  ==================================================================================
adam      :math:`\frac{lr}{1-\beta_1^t}\big/\big(\sqrt{v/(1-\beta_2^t)}+\epsilon\big)`
          (Adam, AdamW; :math:`v` = ``max_exp_avg_sq`` with ``amsgrad``), multiplies :math:`m`
nadam     :math:`\frac{lr\,\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\big/\big(\sqrt{v/(1-\beta_2^t)}
          +\epsilon\big)`, :math:`\mu_t=\beta_1(1-\tfrac12 0.96^{t\psi})` (Dozat 2016),
          multiplies :math:`m`
radam     :math:`\frac{lr}{1-\beta_1^t}\, r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt v+\epsilon}` when
          :math:`\rho_t>5`, else :math:`\frac{lr}{1-\beta_1^t}` (Liu et al. 2020), multiplies
          :math:`m`
adamax    :math:`\frac{lr}{1-\beta_1^t}\big/u` with :math:`u` = ``exp_inf``, multiplies :math:`m`
adagrad   :math:`\frac{lr}{1+(t-1)\,\text{lr\_decay}}\big/(\sqrt{\textstyle\sum g^2}+\epsilon)`,
          multiplies :math:`g`
rmsprop   :math:`lr/(\sqrt{E[g^2]-E[g]^2\,[\text{centered}]}+\epsilon)`, multiplies :math:`g`
          (with momentum: the factor of :math:`g` in the momentum buffer, times ``lr``)
adadelta  :math:`lr\,\sqrt{E[\Delta^2]+\epsilon}/\sqrt{E[g^2]+\epsilon}`; the state already holds
          the last update in :math:`E[\Delta^2]`, so this is the factor of the *next* step
          before its own gradient enters
========  ==================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_aw.optim._registry import STEP_RULES, info_for_class

__all__ = ["AdaptiveStepMonitor", "effective_step_sizes", "param_step_size"]

_Scalar = float | Tensor


def _scalar(x: Any, like: Tensor) -> _Scalar:
    """A Python float for numbers and CPU scalars (free), else a tensor on ``like``'s device (no
    host synchronisation, e.g. the ``step`` of a fused or capturable optimizer on the GPU)."""
    if isinstance(x, Tensor):
        if x.device.type == "cpu":
            return float(x)
        return x.to(device=like.device, dtype=like.dtype)
    return float(x)


def _real(x: Tensor) -> Tensor:
    x = torch.view_as_real(x) if torch.is_complex(x) else x
    return x if x.dtype == torch.float64 else x.float()


def param_step_size(rule: str, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor | None:
    """The effective step size of each element of one parameter (see the module's table).

    Args:
        rule: one of :data:`~lightning_aw.optim.STEP_RULES` (``"adam"``, ``"adagrad"``, ...).
        state: the optimizer's state of the parameter (``optimizer.state[p]``).
        group: the parameter's group (``lr``, ``betas``, ``eps``, ...).

    Returns:
        A float tensor shaped like the parameter (complex parameters: like their real view), on
        the state's device; ``None`` when the parameter has no state yet.

    Raises:
        ValueError: for an unknown rule.

    Example::

        >>> p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = torch.optim.Adam([p], lr=0.1)
        >>> p.grad = torch.tensor([0.5, -2.0]); opt.step()
        >>> eta = param_step_size("adam", opt.state[p], opt.param_groups[0])
        >>> eta  # step 1: lr / (1 - beta1) / |g|
        tensor([2.0000, 0.5000])
        >>> eta * opt.state[p]["exp_avg"]  # the step taken: lr * sign(g)
        tensor([ 0.1000, -0.1000])
    """
    if rule not in STEP_RULES:
        raise ValueError(f"Parameter `rule` should be one of {sorted(STEP_RULES)}. Found {rule!r}.")
    if not state or any(k not in state for k in STEP_RULES[rule]):
        return None
    lr_raw, eps = group["lr"], float(group.get("eps", 0.0))
    if rule in ("adam", "nadam", "radam"):
        key = "max_exp_avg_sq" if rule == "adam" and group.get("amsgrad") else "exp_avg_sq"
        if key not in state:
            return None
        v = _real(state[key])
        t, lr = _scalar(state["step"], v), _scalar(lr_raw, v)
        b1, b2 = (_scalar(b, v) for b in group["betas"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if rule == "adam":
            return lr / bc1 / ((v / bc2).sqrt() + eps)
        if rule == "nadam":
            psi = float(group["momentum_decay"])
            mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
            mu_product = _scalar(state["mu_product"], v)
            return lr * mu_next / (1 - mu_product * mu_next) / ((v / bc2).sqrt() + eps)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bc2
        base = lr / bc1
        if isinstance(rho_t, float) and rho_t <= 5.0:
            return torch.full_like(v, float(base))
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
        adaptive = base * rect * bc2**0.5 / (v.sqrt() + eps)
        if isinstance(rho_t, float):
            return adaptive
        return torch.where(rho_t > 5.0, adaptive, torch.full_like(v, 1.0) * base)
    if rule == "adamax":
        u = _real(state["exp_inf"])
        t, lr = _scalar(state["step"], u), _scalar(lr_raw, u)
        b1 = _scalar(group["betas"][0], u)
        return lr / (1 - b1**t) / u
    if rule == "adagrad":
        s = _real(state["sum"])
        t, lr = _scalar(state["step"], s), _scalar(lr_raw, s)
        clr = lr / (1 + (t - 1) * float(group.get("lr_decay", 0.0)))
        return clr / (s.sqrt() + eps)
    if rule == "rmsprop":
        sq = _real(state["square_avg"])
        lr = _scalar(lr_raw, sq)
        if group.get("centered") and "grad_avg" in state:
            g = _real(state["grad_avg"])
            sq = (sq - g * g).clamp_min(0.0)
        return lr / (sq.sqrt() + eps)
    # adadelta
    sq = _real(state["square_avg"])
    acc = _real(state["acc_delta"])
    lr = _scalar(lr_raw, sq)
    return lr * (acc + eps).sqrt() / (sq + eps).sqrt()


def _rule_of(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """(step rule or None, why not) of an optimizer, from the registry."""
    info = info_for_class(type(optimizer))
    if info is None:
        return None, "it is not in the lightning_aw.optim registry"
    if not info.adaptive:
        return None, "it is not adaptive (every parameter's step is the learning rate)"
    if info.step_rule is None:
        return None, f"the registry has no step-size formula for {info.name!r}"
    return info.step_rule, ""


#: State read by a step rule besides its STEP_RULES keys, when the group asks for it.
_OPTIONAL_KEYS = frozenset({"max_exp_avg_sq", "grad_avg"})


def _allocate(sizes: Sequence[int], budget: int) -> list[int]:
    """How many elements to sample from each part: all of them when they fit in ``budget``, else
    ``budget`` in all, in proportion to the sizes (largest remainders get the rounding)."""
    total = sum(sizes)
    if total <= budget:
        return list(sizes)
    exact = [s * budget / total for s in sizes]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: budget - sum(counts)]:
        counts[i] += 1
    return counts


def _group_labels(optimizer: torch.optim.Optimizer) -> list[str]:
    labels: list[str] = []
    for i, group in enumerate(optimizer.param_groups):
        label = str(group.get("name") or f"group{i}")
        labels.append(label if label not in labels else f"{label}_{i}")
    return labels


def effective_step_sizes(
    optimizer: torch.optim.Optimizer, rule: str | None = None
) -> dict[str, Tensor]:
    """Every effective per-parameter step size of an optimizer, by parameter group.

    Args:
        optimizer: a registered adaptive optimizer (or any optimizer with ``rule``).
        rule: the step rule (default: the registry's for the optimizer's class).

    Returns:
        Group name (``param_groups[i]["name"]``, else ``group<i>``) to a flat tensor of the step
        sizes of its parameters that have state; groups without state are left out.

    Raises:
        ValueError: when the optimizer has no known step rule and none is given.

    Example::

        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adagrad([{"params": [p], "name": "w"}], lr=0.1, eps=0.0)
        >>> p.grad = torch.tensor([1.0, 2.0, 4.0]); opt.step()
        >>> effective_step_sizes(opt)
        {'w': tensor([0.1000, 0.0500, 0.0250])}
    """
    if rule is None:
        rule, why = _rule_of(optimizer)
        if rule is None:
            raise ValueError(
                f"Cannot compute step sizes for {type(optimizer).__name__}: {why}. Pass `rule`."
            )
    out: dict[str, Tensor] = {}
    for label, group in zip(_group_labels(optimizer), optimizer.param_groups, strict=True):
        parts = [param_step_size(rule, optimizer.state.get(p, {}), group) for p in group["params"]]
        flat = [x.reshape(-1) for x in parts if x is not None]
        if flat:
            device = flat[0].device
            out[label] = torch.cat([x.to(device) for x in flat])
    return out


class AdaptiveStepMonitor(Callback):
    r"""Logs the distribution of adaptive optimizers' effective per-parameter step sizes.

    Every ``every_n_steps`` optimizer steps, for each optimizer and parameter group, it computes
    :math:`\eta_j` of every parameter element from the optimizer state (formulas in
    :mod:`lightning_aw.optim._monitor`: Adam/AdamW/NAdam/RAdam/Adamax, AdaGrad with
    ``lr_decay``, RMSprop plain and centered, Adadelta) and logs

    - scalars ``step_size/<group>/median``, ``step_size/<group>/p10``, ``step_size/<group>/p90``
      (one per entry of ``quantiles``) to every logger, at step ``trainer.global_step`` (so the
      step of the chart is the :math:`t` of the formulas); with several optimizers the group is
      prefixed by ``opt<k>/``,
    - a TensorBoard histogram ``step_size/<group>/log10`` of :math:`\log_{10}\eta` (or
      ``step_size/<group>`` of :math:`\eta` with ``log10=False``) on each ``TensorBoardLogger``.

    Groups are ``param_groups[i]["name"]`` (``shared``, ``task/<name>``, ``other``,
    ``weighting`` with :class:`~lightning_aw.MultiTaskModule`'s default optimizer), else
    ``group<i>``. Between logging steps it returns at once. Everything is computed on the
    parameters' device (GPU included) with one host transfer per logging step, on global rank
    zero only (the optimizer state is identical on every DDP rank). Parameters without state yet
    (never stepped) are skipped. An optimizer it cannot interpret (SGD, Lion, an unregistered
    class, ...) gets one warning and is skipped.

    Large groups: ``torch.quantile`` takes at most 16M elements, and a histogram of a whole
    model is costly, so a group with more than ``max_samples`` elements is summarised by a
    stratified random sample: exactly ``max_samples`` elements, split over the group's parameters
    in proportion to their sizes, each parameter's drawn uniformly with replacement from a
    generator seeded by ``seed``. The quantiles are then estimates, with a standard error of
    about :math:`\sqrt{q(1-q)/n}` in quantile level (0.0016 for the median of the default
    10^5 samples).

    Args:
        every_n_steps: log every this many optimizer steps.
        histograms: also write TensorBoard histograms.
        quantiles: the quantile levels logged as scalars (0.5 is named ``median``, others
            ``p<100 q>``).
        max_samples: the most elements per group that quantiles and histograms use (at most
            16,000,000).
        log10: histogram :math:`\log_{10}\eta` (step sizes span decades) rather than :math:`\eta`.
        seed: the seed of the subsampling generator.

    Raises:
        ValueError: for invalid arguments.

    Example::

        >>> import lightning.pytorch as pl
        >>> monitor = AdaptiveStepMonitor(every_n_steps=10, quantiles=(0.25, 0.5, 0.75))
        >>> monitor
        AdaptiveStepMonitor(every_n_steps=10, histograms=True, quantiles=(0.25, 0.5, 0.75))
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: bool = True,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        max_samples: int = 100_000,
        log10: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"Parameter `every_n_steps` should be an int >= 1. Found {every_n_steps!r}."
            )
        qs = tuple(float(q) for q in quantiles)
        if not qs or any(not 0.0 <= q <= 1.0 for q in qs) or len(set(qs)) != len(qs):
            raise ValueError(
                "Parameter `quantiles` should be distinct levels in [0, 1]. "
                f"Found {tuple(quantiles)!r}."
            )
        if (
            not isinstance(max_samples, int)
            or isinstance(max_samples, bool)
            or not 1 <= max_samples <= 16_000_000
        ):
            raise ValueError(
                "Parameter `max_samples` should be an int in [1, 16_000_000] (torch.quantile's "
                f"limit). Found {max_samples!r}."
            )
        self.every_n_steps = every_n_steps
        self.histograms = bool(histograms)
        self.quantiles = qs
        self.max_samples = max_samples
        self.log10 = bool(log10)
        self.seed = int(seed)
        self._last_step = -1
        self._warned: set[str] = set()
        self._generators: dict[torch.device, torch.Generator] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_steps={self.every_n_steps}, "
            f"histograms={self.histograms}, quantiles={self.quantiles})"
        )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, quantiles=self.quantiles)

    @staticmethod
    def quantile_name(q: float) -> str:
        """``median`` for 0.5, else ``p<percent>`` (``p10``, ``p2.5``)."""
        return "median" if q == 0.5 else f"p{100 * q:g}"

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps or step == 0:
            return  # not a logging step, or inside an accumulation window: nothing to do
        self._last_step = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        self.log_step_sizes(trainer, step)

    def log_step_sizes(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Compute and log the step-size statistics of ``trainer.optimizers`` now.

        Returns:
            The scalars logged, by name.
        """
        optimizers = list(trainer.optimizers)
        samples: dict[str, Tensor] = {}
        for k, optimizer in enumerate(optimizers):
            rule, why = _rule_of(optimizer)
            if rule is None:
                self._warn_once(optimizer, why)
                continue
            prefix = f"opt{k}/" if len(optimizers) > 1 else ""
            for label, group in zip(_group_labels(optimizer), optimizer.param_groups, strict=True):
                sample = self._group_sample(rule, optimizer, group)
                if sample is not None:
                    samples[prefix + label] = sample
        if not samples:
            return {}
        names = [self.quantile_name(q) for q in self.quantiles]
        stats = []
        for sample in samples.values():
            q = torch.tensor(self.quantiles, device=sample.device, dtype=sample.dtype)
            stats.append(torch.quantile(sample, q).to(samples[next(iter(samples))].device))
        values = torch.stack(stats).cpu().tolist()  # the one host transfer
        metrics = {
            f"step_size/{label}/{name}": float(v)
            for label, row in zip(samples, values, strict=True)
            for name, v in zip(names, row, strict=True)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.histograms:
            tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            if tb:
                for label, sample in samples.items():
                    values_h = sample.detach().float().cpu()
                    tag = f"step_size/{label}"
                    if self.log10:
                        values_h, tag = values_h.log10(), tag + "/log10"
                    values_h = values_h[torch.isfinite(values_h)]
                    if values_h.numel():
                        for logger in tb:
                            logger.experiment.add_histogram(tag, values_h, global_step=step)
        return metrics

    def _group_sample(
        self, rule: str, optimizer: torch.optim.Optimizer, group: Mapping[str, Any]
    ) -> Tensor | None:
        keys = STEP_RULES[rule]
        stepped = []
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and all(k in state for k in keys):
                stepped.append((p, state))
        if not stepped:
            return None
        sizes = [p.numel() * (2 if torch.is_complex(p) else 1) for p, _ in stepped]
        counts = _allocate(sizes, self.max_samples)
        parts: list[Tensor] = []
        for (p, state), count, size in zip(stepped, counts, sizes, strict=True):
            if count == 0:
                continue
            if count < size and not torch.is_complex(p):
                # draw the elements first, then evaluate the formula on them only
                gen = self._generator(p.device)
                idx = torch.randint(size, (count,), device=p.device, generator=gen)
                state = {
                    k: v.reshape(-1)[idx] if isinstance(v, Tensor) and v.numel() == size else v
                    for k, v in state.items()
                    if k in keys or k in _OPTIONAL_KEYS
                }
            eta = param_step_size(rule, state, group)
            if eta is None:
                continue
            flat = eta.reshape(-1)
            if count < flat.numel():  # complex parameters: sample their real view
                gen = self._generator(flat.device)
                idx = torch.randint(flat.numel(), (count,), device=flat.device, generator=gen)
                flat = flat[idx]
            parts.append(flat)
        if not parts:
            return None
        device = parts[0].device
        return torch.cat([x.to(device) for x in parts])

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _warn_once(self, optimizer: torch.optim.Optimizer, why: str) -> None:
        name = type(optimizer).__name__
        if name in self._warned:
            return
        self._warned.add(name)
        rank_zero_warn(
            f"AdaptiveStepMonitor: nothing to monitor for {name}: {why}. It is skipped. "
            "Register it with a `step_rule` (lightning_aw.optim.register_optimizer) if it is an "
            "adaptive optimizer of a known form."
        )
