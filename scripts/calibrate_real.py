"""Calibrate the synthetic tasks to a real model and report (what README "Real pretrained models" quotes).

    python scripts/calibrate_real.py gemma3-270m outputs/runs/cal-gemma3 20 8
    (model, run directory, calibration_n per level, batch size)

Opens a run with ``calibrate=True`` (notebook 01's first step only: calibration, problems,
labels of a small training/validation set at the chosen levels), then prints the calibration
table, the per-task accuracy on the (disjoint) validation split and the class sufficiency.
"""

import sys
import time

import pandas as pd

from so2lib.phases import calibration, study

name, run_dir = sys.argv[1], sys.argv[2]
n_cal = int(sys.argv[3]) if len(sys.argv) > 3 else 20
bs = int(sys.argv[4]) if len(sys.argv) > 4 else 8
n_train = int(sys.argv[5]) if len(sys.argv) > 5 else 60
n_val = int(sys.argv[6]) if len(sys.argv) > 6 else 60
t0 = time.perf_counter()
setup = study.open_run(run_dir, name, n_train=n_train, n_val=n_val, seed=0, device="cpu", batch_size=bs,
                       calibrate=True, calibration_n=n_cal, calibration_policy="flag", progress=False)
pd.set_option("display.width", 250)
pd.set_option("display.max_colwidth", 120)
print(calibration.table(setup.run.load("calibration")).round(3).to_string())
print(study.per_task_table(setup).round(3).to_string())
print(calibration.class_sufficiency(setup.labels).to_string())
print(f"wall time {time.perf_counter() - t0:.0f} s (model {name}, calibration_n {n_cal}, "
      f"n_train {n_train}, n_val {n_val}, batch {bs})")
