"""The README's quick start defines a module that trains as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl

from lightning_aw import GradNorm
from lightning_aw.datasets import TwoDigitsDataModule

README = Path(__file__).resolve().parents[1] / "README.md"
OVERHEAD = README.parent / "docs" / "overhead_cpu.json"


def test_quick_start_module_trains(tmp_path):
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    definition = block.split("\ntrainer = ")[0]  # the imports and the class, as a user copies them
    namespace: dict = {}
    exec(compile(definition, str(README), "exec"), namespace)
    net = namespace["Net"]()
    gn = GradNorm(alpha=1.5)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[gn],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(net, TwoDigitsDataModule(train_pairs=96, val_pairs=32, batch_size=32))
    assert trainer.global_step == 3
    assert abs(sum(gn.weights.values()) - 3.0) < 1e-4
    assert gn.weights != {"left": 1.0, "right": 1.0, "sum": 1.0}


def test_methods_table_is_the_registry_s():
    """The README's methods table is what the registry (and `lightning-aw methods`) says, with
    the step times the benchmark recorded in docs/overhead_cpu.json."""
    from lightning_aw.registry import list_methods, methods_table

    text = README.read_text()
    marker = text.index("<!-- methods-table:")
    start = text.index("\n", marker) + 1
    end = text.index("\n\n", start)
    ratios = json.loads(OVERHEAD.read_text())["ratios"]
    assert text[start:end] == methods_table(markdown=True, overhead=ratios)
    rows = methods_table(markdown=True, overhead=ratios).splitlines()
    column = [c.strip() for c in rows[0].strip("|").split("|")].index("step time")
    cells = {
        m: [c.strip() for c in r.strip("|").split("|")]
        for m, r in zip(list_methods(), rows[2:], strict=True)
    }
    unmeasured = [m for m, c in cells.items() if c[column] == "-"]
    assert unmeasured == [], f"no step time recorded for {unmeasured}: rerun the benchmark"


def test_quick_start_module_saves_its_hyperparameters(tmp_path):
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block.split("\ntrainer = ")[0], str(README), "exec"), namespace)
    net = namespace["Net"](lr=0.01)
    assert dict(net.hparams) == {"lr": 0.01}
    assert net.optimizer_spec == {"name": "adam", "lr": 0.01}
