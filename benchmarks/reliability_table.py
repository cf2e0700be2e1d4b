"""Run the reliability suite and write docs/reliability.md: methods x conditions, pass/fail.

    python benchmarks/reliability_table.py            # runs the tests (~1 minute on 2 idle cores)
    python benchmarks/reliability_table.py --junit r.xml [--junit more.xml]   # reuse results

It runs ``tests/test_matrix.py``, ``tests/test_faults.py``, ``tests/test_fuzz.py``, the
old-checkpoint tests of ``tests/test_resume.py`` and the DDP matrix of ``tests/test_ddp.py`` with
pytest's ``--junitxml``, maps every test id (``<test>[<method>-<condition>]``) to a cell, and
writes the table. A cell passes when every test behind it passed; a test that is skipped shows its
written reason; a cell no test covers says so. Exit status 1 if any cell failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lightning_aw.registry import get_method, list_methods  # noqa: E402

TESTS = [
    "tests/test_matrix.py",
    "tests/test_faults.py",
    "tests/test_fuzz.py",
    "tests/test_resume.py::test_old_checkpoint_other_task_list",
    "tests/test_resume.py::test_old_checkpoint_other_method",
    "tests/test_resume.py::test_old_checkpoint_other_hyperparameters",
    "tests/test_ddp.py::test_ddp_matrix",
    "tests/test_fsdp.py::test_fsdp_equals_ddp",
    "tests/test_fsdp.py::test_fsdp_refused",
]
PRECISIONS = ("32", "bf16", "fp16")

#: the tests behind each functional twin (test_fuzz.py)
FUZZ_TESTS = {
    "equal": ["test_equal"],
    "renormalize": ["test_renormalize"],
    "uncertainty_weights": ["test_uncertainty_weights"],
    "uncertainty_loss": ["test_uncertainty_loss"],
    "dwa": ["test_dwa"],
    "gradnorm_weight_grad": ["test_gradnorm_weight_grad"],
    "rlw": ["test_rlw"],
    "imtl_l_loss": ["test_imtl_l_loss"],
    "famo_logit_grad": ["test_famo_logit_grad"],
    "softadapt": ["test_softadapt"],
    "relobralo": ["test_relobralo"],
    "gram_matrix": ["test_gram_matrix"],
    "db_mtl": ["test_db_mtl"],
    "graddrop": ["test_graddrop"],
    "excess_mtl": ["test_excess_mtl"],
    "moco": ["test_moco"],
    "project_simplex": ["test_project_simplex"],
    "lr_annealing": ["test_lr_annealing"],
    "auto_lambda_grad": ["test_auto_lambda_grad"],
    **{f: [f"test_multibatch_weights[{f}]"] for f in ("modo", "sdmgrad")},
    **{
        f: [f"test_log_losses[{f}]"]
        for f in ("gls_loss", "gls_weights", "scale_invariant_loss", "scale_invariant_weights")
    },
    **{f: [f"test_famo[{f}]"] for f in ("famo_loss", "famo_weights")},
    **{f: [f"test_stch[{f}]"] for f in ("stch_loss", "stch_weights")},
    **{f: [f"test_gradvac[{f}]"] for f in ("gradvac", "gradvac_from_gram")},
    **{
        f: [f"test_coefficients_from_gradients[{f}]"]
        for f in (
            *("mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad"),
            *("fairgrad", "con_fig"),
            "dual_proj",
        )
    },
    **{
        f"{f}_from_gram": [f"test_coefficients_from_gram[{f}]"]
        for f in (
            *("mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad"),
            *("fairgrad", "con_fig"),
            "dual_proj",
        )
    },
}


def columns(method: str) -> dict[str, list[str]]:
    """The test ids behind each cell of ``method``'s row."""
    from fsdp_script import REFUSED, cases
    from test_fuzz import METHOD_TWINS

    fsdp_cases = [c for c in cases() if c not in REFUSED]

    acc = {p: f"test_precision_accumulation_clipping[{method}-{p}-acc1]" for p in PRECISIONS}
    acc2 = [f"test_precision_accumulation_clipping[{method}-{p}-acc2]" for p in PRECISIONS]
    twins = METHOD_TWINS.get(method, [])
    return {
        "32": [acc["32"]],
        "bf16": [acc["bf16"]],
        "fp16": [acc["fp16"]],
        "accum 2": acc2,
        "clip": [*acc.values(), *acc2],
        "resume mid-epoch": [f"test_resume_mid_epoch[{method}-acc{a}]" for a in (1, 2)],
        "DDP": [f"test_ddp_matrix[{method}-32]"],
        "DDP bf16+accum": [f"test_ddp_matrix[{method}-bf16acc2]"],
        "FSDP2": [f"test_fsdp_refused[refuse/{method}]"]
        if f"refuse/{method}" in REFUSED
        else [f"test_fsdp_equals_ddp[{c}]" for c in fsdp_cases if c.split("-")[0] == method],
        "NaN raise": [f"test_nonfinite_raise[{method}]"],
        "NaN skip": [f"test_nonfinite_skip[{method}]"],
        "absent task": [f"test_absent_task[{method}]"],
        "zero loss": [f"test_zero_loss[{method}]"],
        "extreme scales": [f"test_extreme_scales[{method}]"],
        "scaler skip": [f"test_scaler_skip[{method}]"],
        "old checkpoint": [
            f"test_old_checkpoint_other_{kind}[{method}]"
            for kind in ("task_list", "method", "hyperparameters")
        ],
        "fuzz": [t for f in twins for t in FUZZ_TESTS[f]],
    }


def run_tests(junit: Path) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *TESTS,
    ]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def read_results(files: Iterable[Path]) -> dict[str, tuple[str, str]]:
    """test name (with parameters) -> (outcome, message)."""
    results: dict[str, tuple[str, str]] = {}
    for file in files:
        for case in ET.parse(file).getroot().iter("testcase"):
            name = case.get("name", "")
            outcome, message = "pass", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "fail", child.get("message", "")
                elif child.tag == "skipped":
                    if child.get("type") == "pytest.xfail":
                        outcome = "xfail"
                    else:
                        outcome, message = "skip", child.get("message", "")
            results[name] = (outcome, message)
    return results


def cell(tests: list[str], results: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """The cell's text and, for a skip, its reason."""
    if not tests:
        return "—", "no test covers this cell"
    found = [results.get(t) for t in tests]
    if any(f is None for f in found):
        missing = [t for t, f in zip(tests, found, strict=True) if f is None]
        return "not run", f"not in the results: {', '.join(missing)}"
    outcomes = [f[0] for f in found]  # type: ignore[index]
    if "fail" in outcomes:
        return "**FAIL**", None
    skips = [f[1] for f in found if f[0] == "skip"]  # type: ignore[index]
    if skips and len(skips) == len(found):
        return "n/a", _skip_reason(skips[0])
    if skips:
        return "pass", _skip_reason(skips[0])
    return "pass", None


def _skip_reason(message: str) -> str:
    return re.sub(r"^Skipped:\s*", "", message).strip()


def render(results: dict[str, tuple[str, str]]) -> tuple[str, int]:
    from fsdp_script import REFUSED
    from test_faults import ZERO_LOSS_ERRORS

    methods = list_methods()
    heads = list(columns(methods[0]))
    notes: dict[str, int] = {}
    rows, failed, total = [], 0, 0
    for m in methods:
        cells = []
        for column, tests in columns(m).items():
            text, reason = cell(tests, results)
            total += 1
            failed += text in ("**FAIL**", "not run")
            if column == "FSDP2" and f"refuse/{m}" in REFUSED and text == "pass":
                text, reason = (
                    "refused",
                    (
                        "refused before the first step with a clear error (`test_fsdp_refused`): "
                        "the method evaluates parts of the batch or the whole model itself"
                    ),
                )
            if column == "absent task" and not get_method(m).partial_labels and text == "pass":
                reason = reason or (
                    "refused at the first batch without the task, with an error naming it (the "
                    "method needs every task in every part of the batch)"
                )
            if column == "zero loss" and m in ZERO_LOSS_ERRORS and text == "pass":
                reason = reason or (
                    "the documented ValueError naming the task (the method takes log L or divides "
                    "by a mean loss)"
                )
            if reason:
                number = notes.setdefault(reason, len(notes) + 1)
                text = f"{text} [{number}]"
            cells.append(text)
        rows.append(f"| `{m}` ({get_method(m).cls.__name__}) | " + " | ".join(cells) + " |")
    lines = [
        "| method | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
        *rows,
    ]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{n}. {reason}" for reason, n in notes.items()]
    return "\n".join(lines), failed


HEADER = """# Reliability

Every registered method under what Lightning users switch on, and under bad input. Each cell is
the outcome of the tests behind it (a cell passes when all of them pass); the table is generated,
do not edit it by hand:

```bash
python benchmarks/reliability_table.py      # runs the suite (about a minute on 2 idle CPU cores)
```

{versions}: **{passed} of {total} cells pass.**

## What each column checks

| column | tests (id `[<method>-...]`) | what must hold |
|---|---|---|
| 32 / bf16 / fp16 | `test_matrix.py::test_precision_accumulation_clipping[...-acc1]` | 32-true, bf16-mixed, fp16 with a real GradScaler (`MixedPrecision("16-mixed", "cpu")`), clipping on: weights finite with the documented total on every step; the loss Lightning backpropagates is the step's loss (× the GradScaler's scale under fp16); gradients within the clip value after clipping (and clipping acted); the parameters moved and are finite |
| accum 2 | the same, `...-acc2`, all three precisions | as above with `accumulate_grad_batches=2`; weights that follow the method's state are constant within a window |
| clip | all six cells above | the clipped gradient norm is at most `gradient_clip_val`, and below it untouched |
| resume mid-epoch | `test_matrix.py::test_resume_mid_epoch[...-acc1/acc2]` | a checkpoint saved in the middle of an epoch, then a crash, resumed with `ckpt_path` (`weights_only=True`, a resumable data loader): parameters, weights and method state bit-identical to the uninterrupted run, also with accumulation 2 |
| DDP | `test_ddp.py::test_ddp_matrix[...-32]` | 2 CPU processes (gloo), different data per rank, a task absent on one rank's odd batches: identical weights after every step and identical parameters on both ranks |
| DDP bf16+accum | `test_ddp.py::test_ddp_matrix[...-bf16acc2]` | the same under bf16-mixed, `accumulate_grad_batches=2`, clipping |
| FSDP2 | `test_fsdp.py::test_fsdp_equals_ddp[...]` (every case of the method: both sources, unmarked, SGD variants), or `test_fsdp_refused[refuse/<method>]` for a method refused under FSDP2 | 2 CPU processes, `ModelParallelStrategy(2, 1)` with `fully_shard` on trunk, heads and module: weights after every step and full parameters equal to the same run under DDP, both ranks identical; "refused": the documented error before the first step |
| NaN raise | `test_faults.py::test_nonfinite_raise` | a NaN loss mid-run raises `FloatingPointError` naming the task, epoch, batch and global step |
| NaN skip | `test_faults.py::test_nonfinite_skip` | with `on_nonfinite="skip"`, the NaN and the Inf step leave weights, method state, parameters and optimizer state untouched; `train/skipped_steps` read back from TensorBoard |
| absent task | `test_faults.py::test_absent_task` | a task absent for 12 consecutive batches (twice): weights finite with the documented total, no NaN in the state, its head untouched meanwhile and training again once it is back |
| zero loss | `test_faults.py::test_zero_loss` | a task whose loss is exactly 0: finite weights and parameters, or the documented `ValueError` naming the task (methods that take `log L`) |
| extreme scales | `test_faults.py::test_extreme_scales` | task losses scaled by 1e-8, 1 and 1e8: finite weights (with the documented total), state and parameters |
| scaler skip | `test_faults.py::test_scaler_skip` | fp16 steps the GradScaler skips on overflow (forced): parameters, weights and method state untouched on those steps, and only those steps skipped |
| old checkpoint | `test_resume.py::test_old_checkpoint_other_*` | resuming a checkpoint saved with another task list, another method, or other hyperparameters (another `state_key`) is a clear `MisconfigurationException` |
| fuzz | `test_fuzz.py` (the method's functional twins) | hypothesis over T = 1..8, scales 1e-8..1e8, zeros, duplicates, rank-deficient gradients, negative/NaN/inf entries: finite outputs with the documented shape and sum, or the documented `ValueError` |

Also part of the reliability suite, not per cell: `tests/test_longrun.py` (state size bounded
over 10,000 updates, 2,000 for the gradient methods; host reads per training step from library
code: exactly the module's one finiteness check and loss-floor check, for every method),
`tests/test_precision.py` (accumulation equals the big batch, GradNorm fp16 ≈ fp32, maths outside
autocast), `tests/test_conformance.py` (end-of-epoch resume, pinned values, permutation).

## The table

"""

FOOTER = """

## Behaviour the table relies on (fixed while building it)

- **fp16 steps skipped by the GradScaler do not move the weighting.** The weighting keeps a copy
  of its state at the start of each optimizer step's window (under fp16 only) and rolls it back
  when the GradScaler reports inf/NaN gradients for that step (its `found_inf` flag, which
  `GradScaler.step` reads right after anyway, so no extra stall); such steps are counted in
  `Weighting.scaler_skipped_steps` and do not count as optimizer steps for intervals and
  frequencies. Diagnostic counters (gradient methods' fallbacks, the non-positive-loss counts)
  keep counting.
- **A resume with other hyperparameters is an error**, not a silent restart of the method:
  Lightning finds a callback's state by `state_key` and skips it when absent.
- With `on_nonfinite="skip"` and gradient accumulation, a non-finite loss in any micro-batch
  skips the whole window: `MultiTaskModule` drops the gradients of the window's other
  micro-batches before the optimizer step (parameters and optimizer state untouched) and the
  weighting rolls its state back to the window's start
  (`test_faults.py::test_nonfinite_skip_in_accumulation_window`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", action="append", type=Path, help="reuse pytest junit XML")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    files = args.junit
    if not files:
        junit = Path(tempfile.mkdtemp()) / "reliability.xml"
        run_tests(junit)
        print(f"results: {junit} (reuse with --junit)")
        files = [junit]
    results = read_results(files)
    table, failed = render(results)
    import lightning
    import torch

    total = len(list_methods()) * len(columns(list_methods()[0]))
    versions = (
        f"Last generated with torch {torch.__version__}, lightning {lightning.__version__}, on CPU"
    )
    text = HEADER.format(versions=versions, passed=total - failed, total=total) + table + FOOTER
    args.out.write_text(text)
    print(f"wrote {args.out}: {total - failed}/{total} cells pass")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
