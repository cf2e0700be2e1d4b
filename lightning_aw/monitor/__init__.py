"""TensorBoard diagnostics: gradient-conflict monitoring, figures of the task weights and the
gates of mixture-of-experts blocks.

The figures need matplotlib (``pip install 'lightning-aw[plots]'``); without it the callbacks warn
once and log no figure (:class:`GradientConflictMonitor` still logs its scalars).
"""

from lightning_aw.monitor._conflict import GradientConflictMonitor
from lightning_aw.monitor._figures import WeightFigures
from lightning_aw.monitor._gates import GateMonitor
from lightning_aw.monitor._plotting import plot_weights

__all__ = ["GateMonitor", "GradientConflictMonitor", "WeightFigures", "plot_weights"]
