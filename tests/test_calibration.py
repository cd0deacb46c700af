"""Calibration of task difficulty: levels, the disjoint calibration split, drop vs flag."""

import numpy as np
import pytest

from so2lib.phases import calibration as CAL
from so2lib.data.tasks import LEVELS, TASKS, Template, generator, make_problem_set


def _digits(p):
    return p.meta["level"].get("digits", p.meta["level"].get("depth"))


def test_levels_bound_operands_and_answers_stay_exact():
    import random
    for task, ladder in LEVELS.items():
        for level in ladder:
            gen, rng = generator(task, level), random.Random(5)
            for _ in range(200):
                p = gen(rng)
                assert p.meta["level"] == level
                if task == "logic":
                    assert 1 <= p.meta["depth"] <= level["depth"]
                    continue
                a, b = p.meta["a"], p.meta["b"]
                if task != "algebra":
                    assert len(str(a)) <= level["digits"] and (task == "multiplication" or len(str(b)) <= level["digits"])
                v = int(p.answer)
                assert v == {"addition": a + b, "subtraction": a - b, "multiplication": a * b,
                             "comparison": max(a, b)}.get(task, v)
                if task == "algebra":
                    assert (v + a if p.meta["op"] == "+" else v - a) == b
    with pytest.raises(ValueError, match="not valid"):
        generator("addition", {"depth": 2})
    with pytest.raises(ValueError, match="no difficulty levels"):
        generator("gsm8k", {"digits": 1})


def test_shots_are_drawn_at_the_problem_level():
    p = generator("addition", {"digits": 1})(__import__("random").Random(0))
    shots = Template("fewshot", n_shots=4).shots(p)
    assert len(shots) == 4 and all(s.meta["level"] == {"digits": 1} and s.meta["a"] < 10 for s in shots)
    assert len(Template("fewshot", n_shots=4, task_shots=(("addition", 2),)).shots(p)) == 2


def test_calibration_split_is_disjoint_from_training_and_validation():
    fake = _skill_scorer({t: 1.0 for t in TASKS})  # ability 1: accuracy falls with difficulty
    cal = CAL.calibrate(TASKS, fake, n=40, seed=3)
    ps = make_problem_set(300, 120, seed=3, levels=CAL.chosen_levels(cal), exclude=CAL.excluded_compacts(cal))
    cal_set = CAL.excluded_compacts(cal)
    assert len(cal_set) > 40 * len(TASKS)
    tr, va = {p.compact for p in ps.train}, {p.compact for p in ps.val}
    assert not cal_set & tr and not cal_set & va and not tr & va
    assert CAL.calibration_seed(3) != 3 and CAL.calibration_seed(3) != CAL.calibration_seed(4)
    # the problem set's own draw is at the chosen levels
    for p in ps.train:
        assert p.meta["level"] == cal["tasks"][p.task]["level"]
    # planted failure: without exclude, the same stream can collide (the check can fail)
    same = make_problem_set(40, 20, seed=3, tasks=["addition"], heldout=False, levels={"addition": {"digits": 1}})
    cal1 = CAL.calibration_problems("addition", {"digits": 1}, 40, 3, heldout=False)
    assert {p.compact for p in cal1} & {p.compact for p in same.train + same.val}  # only 100 sums exist


def _skill_scorer(ability: dict[str, float], shots_bonus: float = 0.0):
    """A fake labeller: accuracy = clip(ability - 0.2 * (rank of the level), 0, 1) (deterministic
    share of the problems), plus ``shots_bonus`` per shot above 3."""
    def score(problems, n_shots):
        if not problems:
            return np.zeros(0)
        t = problems[0].task
        rank = LEVELS[t].index(problems[0].meta["level"])
        acc = np.clip(ability[t] - 0.2 * rank + shots_bonus * ((n_shots or 3) - 3), 0, 1)
        k = int(round(acc * len(problems)))
        return np.array([1.0] * k + [0.0] * (len(problems) - k))
    return score


def test_a_task_that_can_be_calibrated_lands_in_the_band():
    # ability 1.0: levels give 1.0, 0.8, 0.6, 0.4, 0.2 -> in band [0.35, 0.75]: 0.6 (closest to 0.55) and 0.4
    cal = CAL.calibrate(["addition"], _skill_scorer({"addition": 1.0}), n=50, seed=0)
    t = cal["tasks"]["addition"]
    assert t["in_band"] and t["action"] == "kept" and t["level"] == {"digits": 3}
    assert t["accuracy"] == pytest.approx(0.6) and len(t["curve"]) == len(LEVELS["addition"])
    assert 0.35 <= t["accuracy"] <= 0.75


def test_a_task_no_level_brings_into_the_band_is_flagged_or_dropped():
    score = _skill_scorer({"algebra": 0.1, "logic": 1.0})  # algebra: 0.1, 0, 0 at every level
    flag = CAL.calibrate(["algebra", "logic"], score, n=40, policy="flag")
    assert flag["tasks"]["algebra"]["action"] == "flagged" and not flag["tasks"]["algebra"]["in_band"]
    assert flag["tasks"]["algebra"]["level"] == {"digits": 1}  # closest to the band: the easiest
    assert CAL.kept_tasks(["algebra", "logic"], flag) == ["algebra", "logic"]
    drop = CAL.calibrate(["algebra", "logic"], score, n=40, policy="drop")
    assert drop["tasks"]["algebra"]["action"] == "dropped"
    assert CAL.kept_tasks(["algebra", "logic"], drop) == ["logic"] and "algebra" not in CAL.chosen_levels(drop)
    assert drop["tasks"]["logic"]["action"] == "kept"
    tab = CAL.table(drop)
    assert tab.loc["algebra", "action"] == "dropped" and "digits=1: 0.10" in tab.loc["algebra", "curve"]
    # too easy everywhere is not calibratable either
    easy = CAL.calibrate(["logic"], _skill_scorer({"logic": 1.9}), n=40, policy="flag")
    assert easy["tasks"]["logic"]["action"] == "flagged" and easy["tasks"]["logic"]["level"] == {"depth": 4}


def test_more_shots_can_bring_a_task_into_the_band():
    score = _skill_scorer({"algebra": 0.2}, shots_bonus=0.05)  # 8 shots: +0.25
    cal = CAL.calibrate(["algebra"], score, n=40, shots=[3, 8])
    t = cal["tasks"]["algebra"]
    assert t["in_band"] and t["n_shots"] == 8 and t["level"] == {"digits": 1}
    assert CAL.task_shots(cal) == (("algebra", 8),)


def test_levels_too_small_for_the_calibration_count_are_skipped():
    # with the held-out partition only ~20 one-digit sums exist: fewer than n=40, never chosen
    cal = CAL.calibrate(["addition"], _skill_scorer({"addition": 0.6}), n=40)
    t = cal["tasks"]["addition"]
    first = t["curve"][0]
    assert first["level"] == {"digits": 1} and first["n"] < 40 and first["too_few"]
    assert t["level"] != {"digits": 1}
    # without the partition (pretrained models saw none of these problems) the 100 one-digit sums
    # supply the level, and a model at 0.6 there is calibrated at it
    whole = CAL.calibrate(["addition"], _skill_scorer({"addition": 0.6}), n=40, heldout=False)["tasks"]["addition"]
    assert whole["curve"][0]["n"] == 40 and not whole["curve"][0]["too_few"]
    assert whole["level"] == {"digits": 1}


def test_heldout_partition_is_for_the_embedded_model_only(tmp_path, tiny_dirs):
    from so2lib.data.tasks import is_heldout
    from so2lib.phases import study
    kw = dict(n_train=60, n_val=30, seed=1, tasks=["addition", "logic"], template="compact", device="cpu",
              progress=False)
    auto = study.open_run(str(tmp_path / "auto"), str(tiny_dirs["llama"]), **kw)
    probs = auto.problems.train + auto.problems.val
    assert not all(is_heldout(p) for p in probs) and auto.run.manifest["data"]["heldout_partition"] is False
    forced = study.open_run(str(tmp_path / "forced"), str(tiny_dirs["llama"]), heldout=True, **kw)
    assert all(is_heldout(p) for p in forced.problems.train + forced.problems.val)
    assert forced.run.manifest["data"]["heldout_partition"] is True
    with pytest.raises(ValueError, match="another run directory"):  # a recorded option is not silently changed
        study.open_run(str(tmp_path / "forced"), str(tiny_dirs["llama"]), heldout=False, **kw)
    with pytest.raises(Exception, match="heldout"):
        study.open_run(str(tmp_path / "bad"), str(tiny_dirs["llama"]), heldout="yes", **kw)
    # a run made before the option existed (no "heldout" recorded) keeps the partition on reopening
    import json
    man = json.loads((tmp_path / "forced" / "manifest.json").read_text())
    man["config"]["phase1"].pop("heldout")
    (tmp_path / "forced" / "manifest.json").write_text(json.dumps(man))
    again = study.open_run(str(tmp_path / "forced"), str(tiny_dirs["llama"]), **kw)
    assert [p.compact for p in again.problems.train] == [p.compact for p in forced.problems.train]


def test_bad_options_are_refused_and_unlevelled_tasks_reported():
    with pytest.raises(ValueError, match="drop"):
        CAL.calibrate(["addition"], _skill_scorer({"addition": 1}), policy="keep")
    with pytest.raises(ValueError, match="accuracy_band"):
        CAL.calibrate(["addition"], _skill_scorer({"addition": 1}), band=(0.8, 0.2))
    cal = CAL.calibrate(["gsm8k"], _skill_scorer({}), n=20)
    assert cal["tasks"]["gsm8k"]["action"] == "not levelled"


def test_class_sufficiency_says_which_phase_lacks_a_class():
    import pandas as pd
    labels = {"train": pd.DataFrame({"correct": [True] * 30 + [False] * 30}),
              "val": pd.DataFrame({"correct": [True] * 5 + [False] * 40})}
    tab = CAL.class_sufficiency(labels)
    assert tab[tab.split == "train"].enough.all()
    assert not tab[tab.split == "val"].enough.any()
    assert set(tab.phase) == set(CAL.PHASES)


def test_open_run_calibrates_on_a_tiny_model(tmp_path, tiny_dirs):
    """End to end on a tiny random model: the calibration artifact, the manifest record, the
    levels of the drawn problems and the three-way disjointness."""
    from so2lib.phases import study
    setup = study.open_run(str(tmp_path / "run"), str(tiny_dirs["llama"]), n_train=60, n_val=30, seed=1,
                           tasks=["addition", "logic"], template="compact", calibrate=True, calibration_n=10,
                           calibration_policy="flag", device="cpu", progress=False)
    rec = setup.run.manifest["calibration"]
    assert set(rec["tasks"]) == {"addition", "logic"}
    assert all(v["action"] in ("kept", "flagged") for v in rec["tasks"].values())
    cal = setup.run.load("calibration")
    ex = CAL.excluded_compacts(cal)
    assert not ex & {p.compact for p in setup.problems.train + setup.problems.val}
    for p in setup.problems.train:
        assert p.meta["level"] == cal["tasks"][p.task]["level"]
    tab = study.per_task_table(setup)
    assert set(tab.index) == {"addition", "logic"} and tab["level"].notna().all()
    assert tab["calibration"].isin(["kept", "flagged"]).all()
    # reopening with the same options resumes; other options are refused
    study.open_run(str(tmp_path / "run"), str(tiny_dirs["llama"]), n_train=60, n_val=30, seed=1, device="cpu",
                   progress=False)
    with pytest.raises(ValueError, match="another run directory"):
        study.open_run(str(tmp_path / "run"), str(tiny_dirs["llama"]), n_train=60, n_val=30, seed=1,
                       calibration_n=20, device="cpu", progress=False)


def test_calibration_parameters_are_checked_before_any_work():
    from so2lib.runs import params, runner
    d = runner.declared_parameters(runner.notebooks(["01"]))
    params.validate({"calibrate": True, "accuracy_band": [0.3, 0.7], "calibration_policy": "drop",
                     "calibration_shots": [3, 8]}, d)
    with pytest.raises(params.ParameterError) as e:
        params.validate({"accuracy_band": [0.8, 0.7], "calibration_policy": "keep", "calibration_n": 3}, d)
    assert "accuracy_band" in str(e.value) and "calibration_policy" in str(e.value) and "calibration_n" in str(e.value)


def test_ladder_search_stops_below_the_band_and_agrees_with_the_full_search():
    calls = []
    base = _skill_scorer({"addition": 1.0, "logic": 0.5})

    def counting(problems, k):
        calls.append(problems[0].meta["level"])
        return base(problems, k)
    full = CAL.calibrate(["addition", "logic"], counting, n=30, search="full")
    n_full = len(calls)
    calls.clear()
    ladder = CAL.calibrate(["addition", "logic"], counting, n=30)
    assert len(calls) < n_full
    for t in ("addition", "logic"):
        assert ladder["tasks"][t]["level"] == full["tasks"][t]["level"]
    # logic: 0.5, 0.3 (below the band) -> depth=3 and 4 not tried
    assert {"depth": 3} not in calls and {"depth": 2} in calls
