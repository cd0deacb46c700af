"""Phase 5 applications, each a row of ``applications_table`` (the columns of ``validation_table``:
measure, measured, ci_low, ci_high, null, target, verdict, how), measured against a null.

- :mod:`.errors`: stratified error analysis with its permutation null and validation replication,
  failure reports, the correctness direction's AUROC against a task-only baseline;
- :mod:`.polysemantic`: polysemanticity against random directions in each neuron's span;
- :mod:`.adversarial`: adversarial problems as CLIP builds them and a neuron-guided variant,
  against difficulty-matched random edits;
- :mod:`.editing`: neuron editing for a systematic error class against random neuron sets;
- :mod:`.phase`: :func:`applications_phase`, all of them on a study's run, for notebook 05.

Whatever the data cannot measure is a ``not testable`` row whose ``how`` starts the reason with
"not measurable", never an exception. Every public name is importable from here.
"""

from so2lib.phases.applications.adversarial import (ARITHMETIC, adversarial_rows, adversarial_variants,
                                                    answers_value, clip_adversarial_pairs, cluster_bootstrap,
                                                    hardest_operand, input_trigger, input_triggers, neuron_push,
                                                    output_concept, paired_rows, random_variants, rebuild,
                                                    solved)
from so2lib.phases.applications.editing import (chosen_minus_random, edit_labels, edit_labels_many, editing_rows,
                                                error_class, random_sets_like, scaling_hooks)
from so2lib.phases.applications.errors import (NotMeasurable, direction_rows, direction_vs_baselines,
                                               discovery_power, error_analysis_rows, error_stratum,
                                               failure_report, null_discoveries,
                                               project_on_direction, separating_neurons, sign_concordance,
                                               stratified_error_analysis, stratified_scan)
from so2lib.phases.applications.phase import applications_phase, neuron_only_rows
from so2lib.phases.applications.polysemantic import (RELATED, category_group, polysemantic_flags,
                                                     polysemanticity, polysemanticity_rows,
                                                     polysemanticity_test, random_in_span, span_basis)
from so2lib.stats import (TABLE_COLUMNS, benjamini_hochberg, not_measurable, validation_row as row,
                          verdict_table as table, wilson_interval)

__all__ = [
    "ARITHMETIC", "NotMeasurable", "RELATED", "TABLE_COLUMNS", "adversarial_variants", "answers_value",
    "applications_phase", "chosen_minus_random", "benjamini_hochberg", "category_group", "clip_adversarial_pairs", "direction_vs_baselines",
    "direction_rows", "edit_labels", "edit_labels_many", "editing_rows", "error_analysis_rows", "error_class",
    "failure_report", "input_trigger", "input_triggers", "neuron_push", "not_measurable",
    "null_discoveries", "output_concept", "paired_rows", "polysemantic_flags", "polysemanticity",
    "polysemanticity_test", "polysemanticity_rows", "project_on_direction", "random_in_span", "random_sets_like",
    "random_variants", "rebuild", "row", "scaling_hooks", "separating_neurons", "sign_concordance", "solved", "span_basis",
    "stratified_error_analysis", "stratified_scan", "table", "wilson_interval",
]
