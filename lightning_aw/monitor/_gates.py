"""`GateMonitor`: what the gated blocks of a model do, per expert and task, on logging steps."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_aw._utils import all_reduce_sum
from lightning_aw.monitor._plotting import (
    MISSING_MATPLOTLIB,
    _new_figure,
    log_figure,
    require_matplotlib,
)
from lightning_aw.nn._attention import CrossStitch, TaskAttention
from lightning_aw.nn._gate import GatedBlock

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GateMonitor"]

#: the statistics logged per TaskAttention mask
_ATT = ("mean", "open")


def gate_heatmap(
    values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], title: str
) -> Figure:
    """A gates × experts heatmap of mean gate values in [0, 1] (NaN: the gate does not span the
    expert, shown blank)."""
    fig = _new_figure((1.6 + 0.55 * len(cols), 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    if len(cols) * len(rows) <= 200:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    color = "black" if v > 0.6 else "white"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("gate")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


class GateMonitor(Callback):
    r"""Log what the gated blocks do: per block, gate and expert, the mean gate weight, the gate
    entropy and the expert utilisation, on Lightning's logging steps.

    It finds every :class:`~lightning_aw.nn.GatedBlock` (:class:`~lightning_aw.nn.MMoE`,
    :class:`~lightning_aw.nn.CGC`, :class:`~lightning_aw.nn.PLE`) among the LightningModule's
    named modules (any LightningModule, not only a ``MultiTaskModule``). On the training steps
    where Lightning logs (``(trainer.global_step + 1) % trainer.log_every_n_steps == 0``, the
    Trainer's own condition) it switches the blocks' recording on in ``on_train_batch_start``
    (off on every other step: the gates then keep nothing), reads each gate's values
    :math:`G \in [0,1]^{B\times E}` of the step's forward in ``on_before_backward`` (every
    micro-batch of the step under gradient accumulation) and logs, at step
    ``trainer.global_step``, for block ``<block>`` (its qualified module name) and gate
    ``<gate>`` (a task, or ``level<k>/<task>`` in PLE):

    - ``<prefix>/<block>/<gate>/weight/<expert>``: the mean gate value
      :math:`\frac{1}{B}\sum_b G_{be}` (they sum to 1 over the experts);
    - ``<prefix>/<block>/<gate>/entropy``: the mean entropy in nats,
      :math:`\frac{1}{B}\sum_b -\sum_e G_{be}\log G_{be}` (:math:`\ln E` for uniform gates, 0
      for one-hot gates: a collapsed gate);
    - ``<prefix>/<block>/<gate>/utilisation/<expert>``: the share of the samples whose largest
      gate value is that expert's (ties: the first).

    Soft-sharing blocks are logged on the same steps: for every
    :class:`~lightning_aw.nn.TaskAttention` and task, ``<prefix>/<block>/<task>/attention/mean``
    (the mean mask value) and ``.../attention/open`` (the share of mask values above 0.5), both
    averaged over the samples; for every :class:`~lightning_aw.nn.CrossStitch` and task,
    ``<prefix>/<block>/<task>/alpha/<source>`` (its row of :math:`\alpha`, the mean over the
    channels for a per-channel unit; parameters, so identical on every rank).

    The values are reduced over the samples of the whole step: under DDP the sums and counts of
    every rank are added in ONE all-reduce (all ranks then hold the same numbers,
    :attr:`last_stats`; rank 0 logs). TensorBoard gets one custom-scalars chart per gate for the
    weights and for the utilisation and one per block for the entropies (in the
    ``lightning_aw`` category of a ``MultiTaskModule``'s layout, else in a category named
    ``prefix``), and at every training epoch's end, with matplotlib, a heatmap image
    ``<prefix>/<block>/heatmap`` of the epoch's mean gate weights (gate × expert; blank where a
    CGC/PLE gate does not span the expert).

    Cost: nothing between logging steps. On a logging step a few reductions on the device per
    gate, one collective under DDP and one host copy of the few numbers at the step's end.
    Only the last forward of a block per micro-batch is seen (a block called twice in one
    ``training_step`` reports the second call).

    Args:
        prefix: the first part of every logged name.
        heatmap: log the epoch heatmap images (needs matplotlib and a TensorBoardLogger).

    Raises:
        ValueError: ``prefix`` is empty or ends with ``/``.
        MisconfigurationException: (at fit start) the module has no gated block, task attention
            or cross-stitch unit.

    Example::

        >>> from lightning_aw.monitor import GateMonitor
        >>> GateMonitor()
        GateMonitor(prefix='gates')
        >>> GateMonitor(prefix="moe").last_stats  # filled in on the logging steps of a fit
        {}
    """

    def __init__(self, prefix: str = "gates", heatmap: bool = True) -> None:
        super().__init__()
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(
                "Parameter `prefix` should be a non-empty string without a trailing '/'. "
                f"Found {prefix!r}."
            )
        self.prefix = prefix
        self.heatmap = bool(heatmap)
        #: per ``<block>/<gate>``: ``count``, ``entropy``, ``weight`` [E], ``utilisation`` [E]
        #: of the last logged step (reduced over the ranks; on every rank)
        self.last_stats: dict[str, dict[str, Tensor]] = {}
        #: the ``global_step`` of the last logged statistics (``-1``: none yet)
        self.last_step = -1
        self._blocks: list[tuple[str, GatedBlock]] = []
        self._layout: list[tuple[str, str, list[str]]] = []  # block, gate key, expert names
        self._attention: list[tuple[str, TaskAttention]] = []
        self._stitch: list[tuple[str, CrossStitch]] = []
        self._alpha: dict[str, dict[str, Tensor]] = {}  # the cross-stitch weights of the step
        self._pending: Tensor | None = None
        self._pending_step = -1
        self._logging = False
        self._epoch: Tensor | None = None  # the epoch's reduced sums (CPU float64)
        self._epoch_steps: list[int] = []
        self._draw = False
        self._warned = False

    def __repr__(self) -> str:
        extra = "" if self.heatmap else ", heatmap=False"
        return f"{type(self).__name__}(prefix={self.prefix!r}{extra})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blocks"] = []  # references into the model: found again at fit start
        state["_attention"], state["_stitch"] = [], []
        state["_pending"] = None
        return state

    # ------------------------------------------------------------------ discovery, layout
    def _find(self, pl_module: pl.LightningModule) -> None:
        named = [(name or "model", m) for name, m in pl_module.named_modules()]
        self._blocks = [(n, m) for n, m in named if isinstance(m, GatedBlock)]
        self._attention = [(n, m) for n, m in named if isinstance(m, TaskAttention)]
        self._stitch = [(n, m) for n, m in named if isinstance(m, CrossStitch)]
        if not (self._blocks or self._attention or self._stitch):
            raise MisconfigurationException(
                f"{self!r} found no gated block (MMoE, CGC, PLE or another "
                "lightning_aw.nn.GatedBlock), TaskAttention or CrossStitch in "
                f"{type(pl_module).__name__}'s modules."
            )
        self._layout = [
            (name, key, block.expert_names(key))
            for name, block in self._blocks
            for key in block.gates()
        ]

    def tensorboard_charts(self, pl_module: pl.LightningModule) -> dict[str, list[Any]]:
        """The custom-scalars charts of the logged gate statistics (title -> ``["Multiline",
        [tag patterns]]``); :class:`~lightning_aw.MultiTaskModule` adds them to its layout."""
        if not (self._blocks or self._attention or self._stitch):
            self._find(pl_module)

        def exact(tags: list[str]) -> list[str]:
            return [f"^{re.escape(t)}$" for t in tags]

        charts: dict[str, list[Any]] = {}
        for block, key, experts in self._layout:
            base = f"{self.prefix}/{block}/{key}"
            charts[f"{base} weights"] = [
                "Multiline",
                exact([f"{base}/weight/{e}" for e in experts]),
            ]
            charts[f"{base} utilisation"] = [
                "Multiline",
                exact([f"{base}/utilisation/{e}" for e in experts]),
            ]
        for block, _ in self._blocks:
            keys = [f"{self.prefix}/{b}/{k}/entropy" for b, k, _ in self._layout if b == block]
            charts[f"{self.prefix}/{block} entropy"] = ["Multiline", exact(keys)]
        for block, att in self._attention:
            tags = [f"{self.prefix}/{block}/{t}/attention/{s}" for t in att.tasks for s in _ATT]
            charts[f"{self.prefix}/{block} attention"] = ["Multiline", exact(tags)]
        for block, unit in self._stitch:
            for t in unit.tasks:
                tags = [f"{self.prefix}/{block}/{t}/alpha/{s}" for s in unit.tasks]
                charts[f"{self.prefix}/{block}/{t} alpha"] = ["Multiline", exact(tags)]
        return charts

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find(pl_module)
        self._pending, self._pending_step, self._epoch, self._epoch_steps = None, -1, None, []
        has_tensorboard = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        self._draw = self.heatmap and has_tensorboard
        if self._draw and require_matplotlib() is None:
            self._draw = False
            if not self._warned:
                self._warned = True
                rank_zero_warn(MISSING_MATPLOTLIB.format(what=f"{type(self).__name__}'s heatmap"))
        # a MultiTaskModule puts these charts in its own layout (one layout per run is read)
        from lightning_aw.module import MultiTaskModule

        if trainer.is_global_zero and not isinstance(pl_module, MultiTaskModule):
            charts = self.tensorboard_charts(pl_module)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars({self.prefix: charts})

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._logging = (trainer.global_step + 1) % max(int(trainer.log_every_n_steps), 1) == 0
        if self._logging:
            # every rank arms the same steps (global_step only), so every rank joins the
            # reduction even if none of its forwards reached a gate
            self._pending_step = trainer.global_step
        for _, block in self._blocks:
            block.record_gates(self._logging)
        for _, att in self._attention:
            att.record_gates(self._logging)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self._logging:
            return
        for name, unit in self._stitch:
            if name not in self._alpha:  # the weights the step's forward used
                self._alpha[name] = {t: a.clone() for t, a in unit.gate_weights.items()}
        if not (self._blocks or self._attention):
            return
        parts: list[Tensor] = []
        ref = None
        for _, block in self._blocks:
            for gate in block.gates().values():
                g = gate.last
                n = gate.num_experts
                if g is None:
                    parts.append(torch.zeros(2 + 2 * n))
                    continue
                gate.last = None  # counted once
                g = g.float().reshape(-1, n)
                ref = g
                parts.append(
                    torch.cat(
                        [
                            g.new_tensor([g.shape[0]]),
                            torch.special.entr(g).sum().reshape(1),
                            g.sum(0),
                            F.one_hot(g.argmax(-1), n).to(g.dtype).sum(0),
                        ]
                    )
                )
        for _, att in self._attention:
            masks, att.last = att.last, {}  # counted once
            for t in att.tasks:
                a = masks.get(t)
                if a is None:
                    parts.append(torch.zeros(3))
                    continue
                per_sample = a.float().reshape(a.shape[0], -1)
                ref = per_sample
                parts.append(
                    torch.stack(
                        [
                            per_sample.new_tensor(float(a.shape[0])),
                            per_sample.mean(1).sum(),
                            (per_sample > 0.5).float().mean(1).sum(),
                        ]
                    )
                )
        device = ref.device if ref is not None else pl_module.device
        stats = torch.cat([p.to(device) for p in parts])
        self._pending = stats if self._pending is None else self._pending + stats

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._pending_step
        if step < 0 or trainer.global_step == step:
            return  # not a logging step, or its optimizer step is not complete (accumulation)
        pending = self._pending
        if pending is None:
            size = sum(2 + 2 * len(experts) for _, _, experts in self._layout)
            size += sum(3 * len(att.tasks) for _, att in self._attention)
            pending = torch.zeros(size, device=pl_module.device)
        self._pending, self._pending_step = None, -1
        # cross-stitch only: nothing to reduce (parameters are identical on every rank)
        (total,) = all_reduce_sum(trainer, pending) if pending.numel() else (pending,)
        self._report(trainer, total.detach().to("cpu", torch.float64), step)

    def _report(self, trainer: pl.Trainer, total: Tensor, step: int) -> None:
        stats: dict[str, dict[str, Tensor]] = {}
        metrics: dict[str, float] = {}
        start = 0
        for block, key, experts in self._layout:
            n = len(experts)
            chunk = total[start : start + 2 + 2 * n]
            start += 2 + 2 * n
            count = float(chunk[0])
            if count <= 0:
                continue
            entry = {
                "count": chunk[0],
                "entropy": chunk[1] / count,
                "weight": chunk[2 : 2 + n] / count,
                "utilisation": chunk[2 + n :] / count,
            }
            stats[f"{block}/{key}"] = entry
            base = f"{self.prefix}/{block}/{key}"
            metrics[f"{base}/entropy"] = float(entry["entropy"])
            for e, w, u in zip(
                experts, entry["weight"].tolist(), entry["utilisation"].tolist(), strict=True
            ):
                metrics[f"{base}/weight/{e}"] = w
                metrics[f"{base}/utilisation/{e}"] = u
        for block, att in self._attention:
            for t in att.tasks:
                count = float(total[start])
                if count > 0:
                    entry = {"count": total[start], "mean": total[start + 1] / count}
                    entry["open"] = total[start + 2] / count
                    stats[f"{block}/{t}"] = entry
                    for name in _ATT:
                        metrics[f"{self.prefix}/{block}/{t}/attention/{name}"] = float(entry[name])
                start += 3
        alphas, self._alpha = self._alpha, {}
        for block, unit in self._stitch:
            for t, row in alphas.get(block, unit.gate_weights).items():
                row = row.detach().float().cpu()
                if row.ndim > 1:  # per channel: the mean over the channels
                    row = row.mean(0)
                stats[f"{block}/{t}"] = {"alpha": row}
                for source, value in zip(unit.tasks, row.tolist(), strict=True):
                    metrics[f"{self.prefix}/{block}/{t}/alpha/{source}"] = value
        self.last_stats, self.last_step = stats, step
        if self._draw:
            self._epoch = total if self._epoch is None else self._epoch + total
            self._epoch_steps.append(step)
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total, steps = self._epoch, self._epoch_steps
        self._epoch, self._epoch_steps = None, []
        if total is None or not self._draw or not trainer.is_global_zero:
            return
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        start = 0
        by_block: dict[str, list[tuple[str, list[str], list[float]]]] = {}
        for block, key, experts in self._layout:
            n = len(experts)
            chunk = total[start : start + 2 + 2 * n]
            start += 2 + 2 * n
            count = float(chunk[0])
            means = (chunk[2 : 2 + n] / count).tolist() if count > 0 else [math.nan] * n
            by_block.setdefault(block, []).append((key, experts, means))
        for block, rows in by_block.items():
            cols: list[str] = []
            for _, experts, _ in rows:
                cols += [e for e in experts if e not in cols]
            matrix = [
                [means[experts.index(c)] if c in experts else math.nan for c in cols]
                for _, experts, means in rows
            ]
            fig = gate_heatmap(
                matrix, [k for k, _, _ in rows], cols, f"{block}: mean gate weights, {span}"
            )
            log_figure(trainer, f"{self.prefix}/{block}/heatmap", fig, trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _, block in self._blocks:
            block.record_gates(True)  # back to the blocks' default
        for _, att in self._attention:
            att.record_gates(True)
