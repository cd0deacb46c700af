"""Calibrate the synthetic tasks to a real model and report (what README "Real pretrained models" quotes).

    python scripts/calibrate_real.py gemma3-270m outputs/runs/cal-gemma3 20 8
    (model, run directory, calibration_n per level, batch size[, n_train, n_val])
    python scripts/calibrate_real.py gemma3-270m DIR 60 50 1000 500 --shots 1,3,5 --no-chat
    (shot counts calibrated too, as ``-p calibration_shots '[1, 3, 5]'``; one-shot prompts, no chat
    template, as the README's runs at power)

Opens a run with ``calibrate=True`` (notebook 01's first step only: calibration, problems,
labels of a small training/validation set at the chosen levels), then prints the calibration
table, the per-task accuracy on the (disjoint) validation split and the class sufficiency.
"""

import argparse
import time

import pandas as pd

from so2lib.phases import calibration, study

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("model")
ap.add_argument("run_dir")
ap.add_argument("n_cal", nargs="?", type=int, default=20)
ap.add_argument("batch_size", nargs="?", type=int, default=8)
ap.add_argument("n_train", nargs="?", type=int, default=60)
ap.add_argument("n_val", nargs="?", type=int, default=60)
ap.add_argument("--shots", help="shot counts to calibrate too, e.g. 1,3,5 (default: the template's own)")
ap.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template (chat=False)")
a = ap.parse_args()
name, run_dir, n_cal, bs, n_train, n_val = a.model, a.run_dir, a.n_cal, a.batch_size, a.n_train, a.n_val
extra = {"calibration_shots": [int(x) for x in a.shots.split(",")]} if a.shots else {}
if a.no_chat:
    extra |= {"chat": False, "n_shots": 1}
t0 = time.perf_counter()
setup = study.open_run(run_dir, name, n_train=n_train, n_val=n_val, seed=0, device="cpu", batch_size=bs,
                       calibrate=True, calibration_n=n_cal, calibration_policy="flag", progress=False, **extra)
pd.set_option("display.width", 250)
pd.set_option("display.max_colwidth", 120)
print(calibration.table(setup.run.load("calibration")).round(3).to_string())
print(study.per_task_table(setup).round(3).to_string())
print(calibration.class_sufficiency(setup.labels).to_string())
print(f"wall time {time.perf_counter() - t0:.0f} s (model {name}, calibration_n {n_cal}, "
      f"n_train {n_train}, n_val {n_val}, batch {bs})")
