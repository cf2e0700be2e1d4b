"""The GPU check script must at least run on the CPU (fp16 through the CPU GradScaler plugin)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--skip-bench"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed")
    cells = [line for line in lines if line.rstrip().endswith(" ok")]
    assert len(cells) == int(lines[-1].split()[0]) >= 12
