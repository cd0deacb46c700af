import json

import pytest

from so2lib.data.tasks import (GENERATORS, TASKS, WORD_TASKS, Problem, Template, default_data_dir, format_number,
                          gsm8k_final_answer, is_heldout, load_gsm8k, load_mawps, load_svamp, load_word_task,
                          make_problem_set, shot_pool)

SHARED_DATA = default_data_dir()  # ../shared/data (or $SO2LIB_DATA)
HAVE_DATA = all((SHARED_DATA / t).is_dir() for t in WORD_TASKS)


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
        assert p.question == " ".join(r["question"].split())
        assert p.answer == r["answer"].split("####")[-1].strip().replace(",", "")
        float(p.answer)
    assert ps[0].answer == "18"
    assert len(load_gsm8k("train", path=SHARED_DATA / "gsm8k", limit=5)) == 5


def test_gsm8k_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL"):
        load_gsm8k("test", path=tmp_path)


def test_gsm8k_malformed_record_named_by_file_and_line(tmp_path):
    f = tmp_path / "test.jsonl"
    good = json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
    f.write_text(good + "\n\n" + '{"question": "q", "answer": ' + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:3: malformed record"):
        load_gsm8k("test", path=tmp_path)
    f.write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: malformed GSM8K record"):
        load_gsm8k("test", path=f)
    f.write_text(good + "\n" + json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: no '#### N'"):
        load_gsm8k("test", path=f)
    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty file"):
        load_gsm8k("test", path=f)


def test_svamp_mawps_bad_files(tmp_path):
    (tmp_path / "SVAMP.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no SVAMP"):
        load_svamp("test", tmp_path)
    (tmp_path / "SVAMP.json").write_text('[{"Body": "a",\n "Question": }]')
    with pytest.raises(ValueError, match=r"SVAMP.json:2: malformed"):
        load_svamp("test", tmp_path)
    (tmp_path / "SVAMP.json").write_text('[{"Body": "a", "Question": "b"}]')
    with pytest.raises(ValueError, match="record 0 is malformed"):
        load_svamp("test", tmp_path)
    with pytest.raises(FileNotFoundError, match="SO2LIB_DATA"):
        load_mawps("test", tmp_path)


def test_format_number():
    assert format_number(8.0) == "8" and format_number(2.5) == "2.5" and format_number(0.25) == "0.25"
    assert format_number(1.1666666666666667) is None and format_number("-3") == "-3"


@pytest.mark.skipif(not HAVE_DATA, reason="shared word-problem data absent")
def test_word_tasks_from_shared_data():
    sizes = {t: (len(load_word_task(t, "train")), len(load_word_task(t, "test"))) for t in WORD_TASKS}
    assert sizes["gsm8k"] == (7473, 1319)
    assert sum(sizes["svamp"]) == 1000  # no SVAMP answer needs more than 2 decimals
    assert 2000 < sum(sizes["mawps"]) <= 2373
    ps = make_problem_set(30, 12, seed=1, tasks=("addition",) + WORD_TASKS)
    again = make_problem_set(30, 12, seed=1, tasks=("addition",) + WORD_TASKS)
    assert [p.compact for p in ps.train + ps.val] == [p.compact for p in again.train + again.val]
    for t in WORD_TASKS:
        tr = {p.compact for p in ps.train if p.task == t}
        va = {p.compact for p in ps.val if p.task == t}
        shots = {p.compact for p in shot_pool(t)}
        assert len(tr) in (7, 8) and len(va) == 3 and not (tr & va) and not (shots & (tr | va))
        p = next(p for p in ps.val if p.task == t)
        text = Template("fewshot", n_shots=2).render(p)
        assert text.count("Q: ") == 3 and text.endswith(f"Q: {p.question}\nA:")
        cot = Template("cot", n_shots=2).render(p)
        assert cot.count("The answer is") == 2
        float(p.answer)
