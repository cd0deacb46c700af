"""so2lib: second-order effects of MLP neurons on math and logic problems in causal LMs.

Adapts "Interpreting the Second-Order Effects of Neurons in CLIP" (Gandelsman, Efros,
Steinhardt, ICLR 2025) to language models, with correctness as the signal.
"""

from so2lib.data.labels import Encoded, accuracy_table, check_classes, encode, label, single_token_subset
from so2lib.data.tasks import TASKS, Problem, ProblemSet, Template, load_gsm8k, make_problem_set
from so2lib.engine.models import ModelInfo, load_model
from so2lib.engine.second_order import (SecondOrderEngine, UnsupportedModelError, projected_effects,
                                        second_order_effects)
from so2lib.runs.rundir import Run

__version__ = "0.1.0"

__all__ = [
    "Encoded", "ModelInfo", "Problem", "ProblemSet", "Run", "SecondOrderEngine", "TASKS", "Template",
    "accuracy_table", "check_classes", "encode", "label", "load_gsm8k", "load_model",
    "make_problem_set", "projected_effects", "second_order_effects", "UnsupportedModelError", "single_token_subset",
]
