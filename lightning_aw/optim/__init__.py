"""Adaptive optimizers for multi-task models: a registry, parameter groups, step-size monitoring.

- a registry of optimizers with frozen metadata (:class:`OptimizerInfo`,
  :func:`list_optimizers`, :func:`get_optimizer`, :func:`register_optimizer`): torch's ``sgd``,
  ``adam``, ``adamw``, ``adagrad``, ``rmsprop``, ``adadelta``, ``adamax``, ``nadam``, ``radam``,
  and optional packages imported only when used (``adamw_schedulefree``/``sgd_schedulefree``
  from ``schedulefree``, ``prodigy`` from ``prodigyopt``, ``lion`` from ``lion-pytorch``);
- :func:`create_optimizer` / :func:`build_optimizers` from a plain-dict spec, with the named
  parameter groups of :func:`named_param_groups` (``shared``, ``task/<name>``, ``other``,
  ``weighting``), per-group overrides and a learning-rate scheduler (:func:`create_scheduler`);
- :class:`AdaptiveStepMonitor`, a callback that logs the distribution of the effective
  per-parameter step sizes of adaptive optimizers.

The spec (a plain dict, so it fits YAML and ``save_hyperparameters``)::

    {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01,
     "groups": {"shared": {"lr": 5e-4}, "task/depth": {"weight_decay": 0.0},
                "weighting": {"lr": 0.025}},
     "scheduler": {"name": "cosine", "T_max": 100, "interval": "step", "frequency": 1}}

Example::

    >>> import torch
    >>> from lightning_aw.optim import create_optimizer, list_optimizers
    >>> list_optimizers("*prop")
    ['rmsprop']
    >>> opt = create_optimizer(torch.nn.Linear(2, 1).parameters(), {"name": "adam", "lr": 0.1})
    >>> type(opt).__name__
    'Adam'
"""

from lightning_aw.optim._groups import (
    DEFAULT_OPTIMIZER,
    WEIGHTING_GROUP,
    build_optimizers,
    create_optimizer,
    named_param_groups,
    validate_optimizer_spec,
)
from lightning_aw.optim._monitor import AdaptiveStepMonitor, effective_step_sizes, param_step_size
from lightning_aw.optim._registry import (
    STEP_RULES,
    OptimizerInfo,
    get_optimizer,
    list_optimizers,
    register_optimizer,
    resolve_optimizer,
)
from lightning_aw.optim._schedulers import (
    SCHEDULERS,
    SchedulerInfo,
    create_scheduler,
    list_schedulers,
)

__all__ = [
    "DEFAULT_OPTIMIZER",
    "SCHEDULERS",
    "STEP_RULES",
    "WEIGHTING_GROUP",
    "AdaptiveStepMonitor",
    "OptimizerInfo",
    "SchedulerInfo",
    "build_optimizers",
    "create_optimizer",
    "create_scheduler",
    "effective_step_sizes",
    "get_optimizer",
    "list_optimizers",
    "list_schedulers",
    "named_param_groups",
    "param_step_size",
    "register_optimizer",
    "resolve_optimizer",
    "validate_optimizer_spec",
]
