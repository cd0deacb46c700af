import json

import pytest

from so2lib.tasks import (GENERATORS, TASKS, Problem, Template, gsm8k_final_answer, is_heldout, load_gsm8k,
                          make_problem_set)

from conftest import SHARED_DATA


def digit_sum(n: int) -> int:
    return sum(map(int, str(n)))


def test_same_seed_same_problems_and_splits_disjoint():
    a = make_problem_set(120, 30, seed=3)
    b = make_problem_set(120, 30, seed=3)
    c = make_problem_set(120, 30, seed=4)
    assert [p.compact for p in a.train] == [p.compact for p in b.train]
    assert [p.compact for p in a.train] != [p.compact for p in c.train]
    assert not {p.compact for p in a.train} & {p.compact for p in a.val}
    assert len(a.train) == 120 and len(a.val) == 30
    assert {p.task for p in a.train} == set(TASKS)
    assert all(is_heldout(p) for p in a.train + a.val)


def test_arithmetic_answers_and_carries_against_closed_forms():
    ps = make_problem_set(600, 0, seed=1, heldout=False).train
    for p in ps:
        m = p.meta
        if p.task == "addition":
            assert int(p.answer) == m["a"] + m["b"]
            # each carry lowers the digit sum by 9
            assert m["n_carries"] == (digit_sum(m["a"]) + digit_sum(m["b"]) - digit_sum(int(p.answer))) // 9
        elif p.task == "subtraction":
            assert int(p.answer) == m["a"] - m["b"] >= 0
            assert m["n_borrows"] == (digit_sum(m["b"]) + digit_sum(int(p.answer)) - digit_sum(m["a"])) // 9
        elif p.task == "multiplication":
            assert int(p.answer) == m["a"] * m["b"] <= 1999
        elif p.task == "comparison":
            assert int(p.answer) == max(m["a"], m["b"]) and m["a"] != m["b"]
        elif p.task == "algebra":
            x = int(p.answer)
            assert (x + m["a"] if m["op"] == "+" else x - m["a"]) == m["b"]


def test_logic_truth_by_python_eval():
    """Independent evaluation: rewrite 'if P then Q' as '(not P or Q)' token by token."""
    def evaluate(text: str) -> bool:
        toks = text.split()

        def parse(i):  # returns (value, next index); grammar of _logic_expr
            if toks[i] == "not":
                v, i = atom(i + 1)
                return not v, i
            if toks[i] == "if":
                a, i = operand(i + 1)
                assert toks[i] == "then"
                b, i = operand(i + 1)
                return (not a) or b, i
            a, i = operand(i)
            if i < len(toks) and toks[i] in ("and", "or"):
                op = toks[i]
                b, i = operand(i + 1)
                return (a and b) if op == "and" else (a or b), i
            return a, i

        def operand(i):
            if toks[i] == "(":
                v, i = parse(i + 1)
                assert toks[i] == ")"
                return v, i + 1
            return atom(i)

        def atom(i):
            if toks[i] in ("true", "false"):
                return toks[i] == "true", i + 1
            if toks[i] == "(":
                return operand(i)
            return parse(i)
        v, i = parse(0)
        assert i == len(toks), text
        return v

    ps = [p for p in make_problem_set(600, 0, seed=2, tasks=["logic"], heldout=False).train]
    for p in ps:
        assert evaluate(p.compact[:-2]) == (p.answer == "true"), p.compact


def test_templates():
    p = GENERATORS["addition"].__call__(__import__("random").Random(0))
    assert Template("compact").render(p) == p.compact
    few = Template("fewshot", n_shots=2).render(p)
    assert few.count("Q:") == 3 and few.endswith(f"Q: {p.question}\nA:")
    assert Template.answer_text(p) == " " + p.answer
    with pytest.raises(ValueError, match="style"):
        Template("nope").render(p)


def test_bad_problem_set_requests():
    with pytest.raises(ValueError, match="unknown task"):
        make_problem_set(10, 10, tasks=["calculus"])
    with pytest.raises(ValueError, match="distinct"):
        make_problem_set(5000, 0, tasks=["multiplication"])  # about 1,100 distinct held-out ones exist


def test_problem_roundtrip():
    p = make_problem_set(6, 0, seed=0).train[0]
    assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_gsm8k_answer_extraction():
    assert gsm8k_final_answer("so 3+4=7\n#### 1,200") == "1200"
    assert gsm8k_final_answer("#### -5") == "-5"
    with pytest.raises(ValueError):
        gsm8k_final_answer("no marker")


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").exists(), reason="shared GSM8K data absent")
def test_gsm8k_loader_on_shared_data():
    ps = load_gsm8k("test", path=SHARED_DATA / "gsm8k")
    with open(SHARED_DATA / "gsm8k" / "test.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(ps) == len(rows) > 1000
    for p, r in zip(ps[:50], rows[:50]):
        assert p.question == r["question"].strip()
        assert p.answer == r["answer"].split("####")[-1].strip().replace(",", "")
        float(p.answer)
    assert ps[0].answer == "18"
    assert len(load_gsm8k("train", path=SHARED_DATA / "gsm8k", limit=5)) == 5


def test_gsm8k_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL"):
        load_gsm8k("test", path=tmp_path)
