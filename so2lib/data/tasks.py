"""Seeded math/logic problem generators, word-problem loaders (GSM8K, SVAMP, MAWPS) and prompt templates.

A :class:`Problem` is template-free: it carries a compact form (``"12 + 7 ="``), a natural
question (``"What is 12 + 7?"``), the gold answer as text (``"19"``), the task name and
metadata. A :class:`Template` turns it into the prompt string for one model family; the
answer continuation is always ``" " + answer`` so that GPT-2-style tokenizers see `` 19``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

TASKS = ("addition", "subtraction", "multiplication", "comparison", "algebra", "logic")
# Word-problem tasks read from files (``../shared/data`` layout, or ``$SO2LIB_DATA``): see :func:`load_word_task`.
WORD_TASKS = ("gsm8k", "svamp", "mawps")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem. ``meta`` holds task-specific facts (operands, carries, connectives, ...)."""

    task: str
    compact: str
    question: str
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Problem":
        return Problem(d["task"], d["compact"], d["question"], d["answer"], dict(d.get("meta", {})))


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# The embedded model is trained only on problems whose compact form falls outside bucket 0
# of this partition; problem sets built with ``heldout=True`` draw only from bucket 0, so the
# embedded model is always evaluated on problems it never saw.
HELDOUT_BUCKETS = 5


def is_heldout(p: Problem) -> bool:
    return stable_hash(p.compact) % HELDOUT_BUCKETS == 0


# ----------------------------------------------------------------------------- generators


def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)][::-1]  # least significant first


def _n_carries_add(a: int, b: int) -> int:
    da, db, carry, n = _digits(a), _digits(b), 0, 0
    for i in range(max(len(da), len(db))):
        s = (da[i] if i < len(da) else 0) + (db[i] if i < len(db) else 0) + carry
        carry = int(s >= 10)
        n += carry
    return n


def _n_borrows_sub(a: int, b: int) -> int:
    da, db, borrow, n = _digits(a), _digits(b), 0, 0
    for i in range(len(da)):
        d = da[i] - (db[i] if i < len(db) else 0) - borrow
        borrow = int(d < 0)
        n += borrow
    return n


def _n_carries_mul(a: int, b: int) -> int:
    """Carries when multiplying multi-digit ``a`` by single-digit ``b`` column by column."""
    carry, n = 0, 0
    for d in _digits(a):
        s = d * b + carry
        carry = s // 10
        n += int(carry > 0)
    return n


def _rand_int(rng: random.Random, n_digits: int) -> int:
    lo = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(lo, 10**n_digits - 1)


def _arith_meta(a: int, b: int, op: str, answer: int) -> dict[str, Any]:
    return {
        "a": a, "b": b, "op": op, "answer_value": answer,
        "digits_a": len(str(a)), "digits_b": len(str(b)), "digits_answer": len(str(answer)),
        "max_digits": max(len(str(a)), len(str(b))),
        "answer_parity": "even" if answer % 2 == 0 else "odd",
    }


def arithmetic_problem(task: str, a: int, b: int) -> Problem:
    """The addition, subtraction, multiplication or comparison problem on operands ``a, b``."""
    if task == "addition":
        c, n = a + b, _n_carries_add(a, b)
        return Problem(task, f"{a} + {b} =", f"What is {a} + {b}?", str(c),
                       _arith_meta(a, b, "+", c) | {"n_carries": n, "carry": n > 0})
    if task == "subtraction":
        c, n = a - b, _n_borrows_sub(a, b)
        return Problem(task, f"{a} - {b} =", f"What is {a} - {b}?", str(c),
                       _arith_meta(a, b, "-", c) | {"n_borrows": n, "borrow": n > 0})
    if task == "multiplication":
        c, n = a * b, _n_carries_mul(a, b)
        return Problem(task, f"{a} * {b} =", f"What is {a} * {b}?", str(c),
                       _arith_meta(a, b, "*", c) | {"n_carries": n, "carry": n > 0})
    if task == "comparison":
        c = max(a, b)
        meta = _arith_meta(a, b, "max", c) | {
            "larger_first": a > b, "same_digits": len(str(a)) == len(str(b)), "gap": abs(a - b),
            "alternative": str(min(a, b))}
        return Problem(task, f"max ( {a} , {b} ) =", f"Which is larger, {a} or {b}?", str(c), meta)
    raise ValueError(f"{task!r} is not an arithmetic task")


def gen_addition(rng: random.Random) -> Problem:
    return arithmetic_problem("addition", _rand_int(rng, rng.randint(1, 3)), _rand_int(rng, rng.randint(1, 3)))


def gen_subtraction(rng: random.Random) -> Problem:
    a, b = _rand_int(rng, rng.randint(1, 3)), _rand_int(rng, rng.randint(1, 3))
    return arithmetic_problem("subtraction", max(a, b), min(a, b))


def gen_multiplication(rng: random.Random) -> Problem:
    b = rng.randint(0, 9)
    a = _rand_int(rng, rng.randint(1, 3))
    while a * b > 1999:  # keep the product a single token of the embedded vocabulary
        a = _rand_int(rng, rng.randint(1, 3))
    return arithmetic_problem("multiplication", a, b)


def gen_comparison(rng: random.Random) -> Problem:
    nd = rng.randint(1, 3)
    a = _rand_int(rng, nd)
    # Half the time a close competitor with the same number of digits (harder).
    b = _rand_int(rng, nd) if rng.random() < 0.5 else _rand_int(rng, rng.randint(1, 3))
    while b == a:
        b = _rand_int(rng, nd)
    return arithmetic_problem("comparison", a, b)


def gen_algebra(rng: random.Random) -> Problem:
    x, a = _rand_int(rng, rng.randint(1, 2)), _rand_int(rng, rng.randint(1, 2))
    if rng.random() < 0.5:
        op, b = "+", x + a
    else:
        x = x + a  # keep x - a >= 0
        op, b = "-", x - a
    meta = {"a": a, "b": b, "op": op, "answer_value": x, "digits_answer": len(str(x)),
            "max_digits": max(len(str(a)), len(str(b))),
            "answer_parity": "even" if x % 2 == 0 else "odd"}
    return Problem("algebra", f"x {op} {a} = {b} ; x =", f"If x {op} {a} = {b}, what is x?", str(x), meta)


_CONNECTIVES = ("and", "or", "if", "not")


def _logic_expr(rng: random.Random, depth: int) -> tuple[str, bool, list[str]]:
    """A random propositional formula over true/false: (text, value, connectives used)."""
    if depth == 0:
        v = rng.random() < 0.5
        return ("true" if v else "false"), v, []
    kind = rng.choice(_CONNECTIVES)
    if kind == "not":
        t, v, c = _logic_expr(rng, depth - 1)
        return f"not {t}" if depth == 1 else f"not ( {t} )", not v, c + ["not"]
    lt, lv, lc = _logic_expr(rng, depth - 1)
    rt, rv, rc = _logic_expr(rng, rng.randint(0, depth - 1))
    wrap = (lambda s: f"( {s} )") if depth > 1 else (lambda s: s)
    if kind == "and":
        return f"{wrap(lt)} and {wrap(rt)}", lv and rv, lc + rc + ["and"]
    if kind == "or":
        return f"{wrap(lt)} or {wrap(rt)}", lv or rv, lc + rc + ["or"]
    return f"if {wrap(lt)} then {wrap(rt)}", (not lv) or rv, lc + rc + ["if"]


def gen_logic(rng: random.Random) -> Problem:
    depth = rng.choice((1, 2, 2, 3, 3))
    text, value, conn = _logic_expr(rng, depth)
    while len(text.split()) > 24:  # keep prompts short
        text, value, conn = _logic_expr(rng, depth)
    ans = "true" if value else "false"
    meta = {"depth": depth, "n_ops": len(conn), "truth": value, "connectives": sorted(set(conn)),
            "main_connective": conn[-1], "alternative": "false" if value else "true",
            **{f"has_{c}": c in conn for c in _CONNECTIVES}}
    return Problem("logic", f"{text} =", f"Is '{text}' true or false?", ans, meta)


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": gen_addition, "subtraction": gen_subtraction,
    "multiplication": gen_multiplication, "comparison": gen_comparison,
    "algebra": gen_algebra, "logic": gen_logic,
}


# ----------------------------------------------------------------------------- difficulty levels
#
# Each synthetic task has a ladder of difficulty levels, easiest first (see
# :mod:`so2lib.phases.calibration`, which picks one per model). A level is a small dict:
# ``{"digits": d}`` (arithmetic, comparison, algebra: every operand has 1..d digits, drawn as
# the default generator draws them) or ``{"depth": D}`` (logic: formula depth 1..D). The
# default generators above are not a level (they stay exactly as they were, e.g. the capped
# products of the embedded model's vocabulary). A problem drawn at a level carries it in
# ``meta["level"]``, and its few-shot examples are drawn at the same level.

LEVELS: dict[str, tuple[dict[str, int], ...]] = {
    "addition": tuple({"digits": d} for d in (1, 2, 3, 4, 5)),
    "subtraction": tuple({"digits": d} for d in (1, 2, 3, 4, 5)),
    "multiplication": tuple({"digits": d} for d in (1, 2, 3, 4)),
    "comparison": tuple({"digits": d} for d in (1, 2, 3, 4, 6)),
    "algebra": tuple({"digits": d} for d in (1, 2, 3)),
    "logic": tuple({"depth": d} for d in (1, 2, 3, 4)),
}


def level_name(level: dict[str, int] | None) -> str:
    """``{"digits": 2}`` -> ``"digits=2"``; ``None`` -> ``"default"``."""
    return "default" if not level else ",".join(f"{k}={v}" for k, v in sorted(level.items()))


def _gen_level(task: str, level: dict[str, int], rng: random.Random) -> Problem:
    if task == "logic":
        depth = rng.randint(1, int(level["depth"]))
        text, value, conn = _logic_expr(rng, depth)
        while len(text.split()) > 12 * depth:
            text, value, conn = _logic_expr(rng, depth)
        ans = "true" if value else "false"
        meta = {"depth": depth, "n_ops": len(conn), "truth": value, "connectives": sorted(set(conn)),
                "main_connective": conn[-1], "alternative": "false" if value else "true",
                **{f"has_{c}": c in conn for c in _CONNECTIVES}}
        return Problem("logic", f"{text} =", f"Is '{text}' true or false?", ans, meta)
    d = int(level["digits"])
    draw = lambda: _rand_int(rng, rng.randint(1, d))  # noqa: E731
    if task == "addition":
        return arithmetic_problem(task, draw(), draw())
    if task == "subtraction":
        a, b = draw(), draw()
        return arithmetic_problem(task, max(a, b), min(a, b))
    if task == "multiplication":
        return arithmetic_problem(task, draw(), rng.randint(0, 9))
    if task == "comparison":
        nd = rng.randint(1, d)
        a = _rand_int(rng, nd)
        b = _rand_int(rng, nd) if rng.random() < 0.5 else draw()
        while b == a:
            b = _rand_int(rng, nd)
        return arithmetic_problem(task, a, b)
    if task == "algebra":
        x, a = draw(), draw()
        if rng.random() < 0.5:
            op, b = "+", x + a
        else:
            x = x + a
            op, b = "-", x - a
        meta = {"a": a, "b": b, "op": op, "answer_value": x, "digits_answer": len(str(x)),
                "max_digits": max(len(str(a)), len(str(b))),
                "answer_parity": "even" if x % 2 == 0 else "odd"}
        return Problem("algebra", f"x {op} {a} = {b} ; x =", f"If x {op} {a} = {b}, what is x?", str(x), meta)
    raise ValueError(f"{task!r} has no difficulty levels; levelled tasks: {sorted(LEVELS)}")


def generator(task: str, level: dict[str, int] | None = None) -> Callable[[random.Random], Problem]:
    """The problem generator of ``task`` at difficulty ``level`` (``None``: the default generator)."""
    if level is None:
        return GENERATORS[task]
    if task not in LEVELS:
        raise ValueError(f"{task!r} has no difficulty levels; levelled tasks: {sorted(LEVELS)}")
    keys = {k for lv in LEVELS[task] for k in lv}
    if set(level) != keys or any(not isinstance(v, int) or v < 1 for v in level.values()):
        raise ValueError(f"level {level!r} of {task!r} is not valid: use a dict with key(s) {sorted(keys)} "
                         f"and integer values >= 1, e.g. {LEVELS[task][0]}")
    lv = dict(level)

    def gen(rng: random.Random) -> Problem:
        p = _gen_level(task, lv, rng)
        p.meta["level"] = dict(lv)
        return p
    return gen


@dataclasses.dataclass
class ProblemSet:
    """Train and validation problems, disjoint by compact form."""

    train: list[Problem]
    val: list[Problem]
    seed: int
    tasks: tuple[str, ...]
    heldout: bool

    def split(self, name: str) -> list[Problem]:
        return {"train": self.train, "val": self.val}[name]

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "tasks": list(self.tasks), "heldout": self.heldout,
                "train": [p.to_dict() for p in self.train], "val": [p.to_dict() for p in self.val]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ProblemSet":
        return ProblemSet([Problem.from_dict(p) for p in d["train"]],
                          [Problem.from_dict(p) for p in d["val"]],
                          d["seed"], tuple(d["tasks"]), d["heldout"])


def _draw(task: str, n: int, rng: random.Random, seen: set[str],
          keep: Callable[[Problem], bool], level: dict[str, int] | None = None) -> list[Problem]:
    out: list[Problem] = []
    misses = 0
    gen = generator(task, level)
    while len(out) < n:
        p = gen(rng)
        if p.compact not in seen and keep(p):
            seen.add(p.compact)
            out.append(p)
            misses = 0
        else:
            misses += 1
            if misses > 20_000:  # the task's space of distinct problems is exhausted
                raise ValueError(f"could not draw {n} distinct {task!r} problems (found {len(out)}); ask for fewer")
    return out


def make_problem_set(n_train: int = 5000, n_val: int = 500, seed: int = 0,
                     tasks: Sequence[str] = TASKS, heldout: bool = True,
                     data_dir: str | Path | None = None, levels: dict[str, dict[str, int]] | None = None,
                     exclude: Iterable[str] = ()) -> ProblemSet:
    """Draw ``n_train`` + ``n_val`` distinct problems, split evenly over ``tasks``.

    ``heldout=True`` keeps only problems the embedded model was not trained on (see
    :func:`is_heldout`); it costs nothing for other models. Word-problem tasks
    (:data:`WORD_TASKS`) draw validation problems from their dataset's test split and
    training problems from its training split (:func:`load_word_task`). Same seed, same problems.
    """
    unknown = [t for t in tasks if t not in GENERATORS and t not in WORD_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(GENERATORS) + list(WORD_TASKS)}")
    if not tasks or n_train < 0 or n_val < 0:
        raise ValueError("need at least one task and non-negative problem counts")
    rng = random.Random(seed)
    keep = is_heldout if heldout else (lambda p: True)
    train: list[Problem] = []
    val: list[Problem] = []
    for i, task in enumerate(tasks):
        share = lambda n: n // len(tasks) + (1 if i < n % len(tasks) else 0)  # noqa: E731
        if task in WORD_TASKS:
            shots = {s.compact for s in shot_pool(task, data_dir)}
            for split, n, out in (("test", share(n_val), val), ("train", share(n_train), train)):
                pool = [p for p in load_word_task(task, split, data_dir) if p.compact not in shots]
                if n > len(pool):
                    raise ValueError(f"{task} has {len(pool)} {split} problems, fewer than the {n} asked for; ask for fewer")
                out += random.Random(seed + stable_hash(task + split) % 10**6).sample(pool, n)
            continue
        seen: set[str] = set(exclude)
        lv = (levels or {}).get(task)
        val += _draw(task, share(n_val), rng, seen, keep, lv)
        train += _draw(task, share(n_train), rng, seen, keep, lv)
    return ProblemSet(train, val, seed, tuple(tasks), heldout)


# ----------------------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Template:
    """How problems become prompts for one model family.

    ``style="compact"`` renders ``"12 + 7 ="`` (the embedded model's format).
    ``style="fewshot"`` renders ``n_shots`` solved examples of the same task in a
    ``Q: ...\\nA: ...`` format that GPT-2 and Pythia follow, then the question (word problems
    take their examples from their dataset's training split, never from the problem set).
    ``style="cot"`` is the same with worked solutions that end in ``The answer is N.``
    (chain-of-thought, see :mod:`so2lib.data.cot`).

    Tokenizer-facing options (applied by :func:`so2lib.data.labels.encode`):
    ``chat``: wrap the question in the tokenizer's chat template (user turn; the assistant turn
    starts with ``A:``); ``space="auto"``: a whitespace token the tokenizer writes before the
    answer goes to the end of the prompt (``"keep"``: leave it in the answer);
    ``bos``: ``"auto"`` (the model's document-start token when it was trained with one), True, False.
    ``task_shots``: ``((task, n), ...)`` overrides ``n_shots`` for those tasks (set by calibration).
    Problems drawn at a difficulty level (``meta["level"]``) get examples at that level.
    """

    style: str = "compact"
    n_shots: int = 3
    shot_seed: int = 1234
    chat: bool = False
    space: str = "auto"
    bos: Any = "auto"
    task_shots: tuple = ()

    def shots(self, p: Problem) -> list[Problem]:
        """The solved examples shown before ``p`` (same task, never ``p`` itself)."""
        if p.task in WORD_TASKS:
            pool = shot_pool(p.task)
            rng = random.Random(self.shot_seed)
            cands = [s for s in rng.sample(pool, min(len(pool), self.n_shots + 1)) if s.compact != p.compact]
            return cands[: self.n_shots]
        rng = random.Random(self.shot_seed + stable_hash(p.task) % 1000)
        shots: list[Problem] = []
        gen = generator(p.task, p.meta.get("level")) if p.task in GENERATORS else None
        n_shots = dict(self.task_shots).get(p.task, self.n_shots)
        while len(shots) < n_shots and gen is not None:
            s = gen(rng)
            if s.compact != p.compact:
                shots.append(s)
        return shots

    def _body(self, p: Problem) -> str:
        if self.style == "cot":
            return "".join(f"Q: {s.question}\nA: {solution_text(s)} The answer is {s.answer}.\n\n"
                           for s in self.shots(p))
        return "".join(f"Q: {s.question}\nA: {s.answer}\n\n" for s in self.shots(p))

    def render(self, p: Problem) -> str:
        if self.style == "compact":
            return p.compact
        if self.style in ("fewshot", "cot"):
            return self._body(p) + f"Q: {p.question}\nA:"
        raise ValueError(f"unknown template style {self.style!r}; use 'compact', 'fewshot' or 'cot'")

    def chat_parts(self, p: Problem) -> tuple[str, str]:
        """``(user message, start of the assistant's reply)`` for chat models."""
        if self.style == "compact":
            return p.compact, ""
        return self._body(p) + f"Q: {p.question}", "A:"

    @staticmethod
    def answer_text(p: Problem) -> str:
        return " " + p.answer


def template_for(model_name: str | None) -> Template:
    """The default template: compact for the embedded model, few-shot for pretrained LMs."""
    return Template("compact") if model_name in (None, "embedded") else Template("fewshot")


# ----------------------------------------------------------------------------- word problems

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_final_answer(solution: str) -> str:
    """The final answer after ``####`` in a GSM8K solution, commas removed (``"1,200"`` -> ``"1200"``)."""
    m = _GSM_ANSWER.search(solution)
    if not m:
        raise ValueError(f"no '#### N' final answer in GSM8K solution: {solution[-80:]!r}")
    return m.group(1).replace(",", "")


def format_number(x: float | int | str) -> str | None:
    """A number as a direct answer: ``8.0`` -> ``"8"``, ``2.5`` -> ``"2.5"``; ``None`` when it
    needs more than 2 decimals (``1.1666...``: no short answer to check exactly)."""
    v = float(x)
    if v == int(v):
        return str(int(v))
    r = round(v, 2)
    return None if abs(r - v) > 1e-9 else f"{r:.2f}".rstrip("0")


def solution_text(p: Problem) -> str:
    """A worked solution for chain-of-thought examples (without the final answer sentence)."""
    sol = p.meta.get("solution")
    if sol:
        body = _CALC.sub("", sol.split("####")[0]).strip()
        return " ".join(body.split())
    if "equation" in p.meta:
        return f"We compute {p.meta['equation']} = {p.answer}."
    return f"We compute {p.compact.rstrip(' =;')} step by step."


DATA_LAYOUT = ("gsm8k/train.jsonl + gsm8k/test.jsonl (one {\"question\", \"answer\"} record per line), "
               "svamp/SVAMP.json, mawps/trainset.json + mawps/testset.json + mawps/validset.json")


def default_data_dir() -> Path:
    """``$SO2LIB_DATA``, else the first ``shared/data`` beside the repository or one of its
    parent folders (``../shared/data`` from the repository root in the usual layout)."""
    env = os.environ.get("SO2LIB_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for d in root.parents:
        if (d / "shared" / "data").is_dir():
            return d / "shared" / "data"
    return root.parent / "shared" / "data"


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed record (not JSON: {e.msg}); fix or remove that line") from e
    if not rows:
        raise ValueError(f"{path} holds no problems (empty file); pass a GSM8K JSONL file")
    return rows


def _gsm_problems(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Problem]:
    out = []
    for i, (where, r) in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{where}: malformed GSM8K record: needs string fields 'question' and 'answer'")
        try:
            ans = gsm8k_final_answer(r["answer"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        q = " ".join(r["question"].split())
        out.append(Problem("gsm8k", q, q, ans, {"index": i, "source": where, "solution": r["answer"],
                                                "answer_value": float(ans), "n_steps": r["answer"].count("<<")}))
    return out


def load_gsm8k(split: str = "test", path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """GSM8K problems with their final answers.

    ``path``: a local JSONL file (``{"question", "answer"}`` per line, as in the original
    release) or a folder holding ``{split}.jsonl``. Without ``path`` it uses
    ``datasets.load_dataset("openai/gsm8k", "main")``, which needs the hub or its cache;
    offline it fails with a message that says to pass ``path``. A malformed record is named
    by file and line; an empty file is refused.
    """
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"GSM8K file {path} not found; pass the path of a JSONL file "
                                    "with 'question' and 'answer' fields")
        rows = [(f"{path}:{n}", r) for n, r in _read_jsonl(path)]
    else:
        try:
            import datasets

            rows = [(f"openai/gsm8k[{split}][{i}]", r)
                    for i, r in enumerate(datasets.load_dataset("openai/gsm8k", "main", split=split))]
        except Exception as e:  # offline, no cache
            raise RuntimeError(
                "could not load GSM8K from the Hugging Face hub (offline and not cached?): "
                f"{type(e).__name__}: {e}. Pass path= to a local GSM8K JSONL file instead."
            ) from e
    if limit is not None:
        rows = rows[:limit]
    return _gsm_problems(rows)


def _read_json_list(path: Path, what: str) -> list[Any]:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} not found; put the {what} files there, or set the "
                                f"environment variable SO2LIB_DATA to a folder laid out as {DATA_LAYOUT}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed {what} file ({e.msg})") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} holds no {what} problems (expected a non-empty JSON list)")
    return data


def _numeric_problems(task: str, path: Path, data: list[Any], fields: tuple[str, str, str]) -> list[Problem]:
    """SVAMP/MAWPS records -> problems; answers that need more than 2 decimals are skipped."""
    qf, ef, af = fields
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or af not in r or (qf not in r and task != "svamp"):
            raise ValueError(f"{path}: record {i} is malformed (needs fields {fields})")
        q = (r["Body"].strip().rstrip(".") + ". " + r["Question"].strip()) if task == "svamp" else r[qf]
        q = " ".join(str(q).split())
        ans = format_number(r[af])
        if ans is None:
            continue
        eq = str(r.get(ef, ""))
        out.append(Problem(task, q, q, ans, {"index": i, "source": f"{path}[{i}]", "equation": eq,
                                             "answer_value": float(r[af]),
                                             "n_steps": sum(eq.count(o) for o in "+-*/")}))
    return out


def load_svamp(split: str = "test", path: str | Path | None = None) -> list[Problem]:
    """SVAMP (1000 problems, one file): a fixed 700/300 train/test partition by problem hash."""
    folder = Path(path) if path is not None else default_data_dir() / "svamp"
    f = folder / "SVAMP.json" if folder.is_dir() or not folder.suffix else folder
    probs = _numeric_problems("svamp", f, _read_json_list(f, "SVAMP"), ("Question", "Equation", "Answer"))
    in_test = lambda p: stable_hash(p.compact) % 10 < 3  # noqa: E731
    return [p for p in probs if in_test(p) == (split == "test")]


def load_mawps(split: str = "test", path: str | Path | None = None) -> list[Problem]:
    """MAWPS (MWPToolkit split): ``trainset.json`` for ``train``, ``testset.json`` + ``validset.json`` for ``test``."""
    folder = Path(path) if path is not None else default_data_dir() / "mawps"
    files = ["trainset.json"] if split == "train" else ["testset.json", "validset.json"]
    out: list[Problem] = []
    for name in files:
        f = folder / name
        out += _numeric_problems("mawps", f, _read_json_list(f, "MAWPS"), ("original_text", "equation", "ans"))
    return out


@functools.lru_cache(maxsize=None)
def _load_cached(task: str, split: str, data_dir: str | None) -> tuple[Problem, ...]:
    d = Path(data_dir) if data_dir else default_data_dir()
    if task == "gsm8k":
        folder = d / "gsm8k"
        if folder.exists() or data_dir:
            return tuple(load_gsm8k(split, folder))
        try:
            return tuple(load_gsm8k(split))
        except RuntimeError as e:  # offline and not cached
            raise FileNotFoundError(
                f"word task 'gsm8k' needs its data: no folder {folder} (and the Hugging Face hub is "
                f"unreachable: {str(e.__cause__ or e)[:120]}). Put the data in that folder, or set the "
                f"environment variable SO2LIB_DATA to a folder laid out as {DATA_LAYOUT}, then run again "
                "(e.g. SO2LIB_DATA=/path/to/data python -m so2lib.runs.runner -p tasks '[\"gsm8k\"]')") from None
    if task == "svamp":
        return tuple(load_svamp(split, d / "svamp"))
    if task == "mawps":
        return tuple(load_mawps(split, d / "mawps"))
    raise ValueError(f"{task!r} is not a word-problem task; choose from {WORD_TASKS}")


def load_word_task(task: str, split: str, data_dir: str | Path | None = None) -> list[Problem]:
    """The problems of word task ``task`` (``"gsm8k"``, ``"svamp"``, ``"mawps"``), ``split``
    ``"train"`` or ``"test"``, from ``data_dir`` (default :func:`default_data_dir`)."""
    return list(_load_cached(task, split, None if data_dir is None else str(data_dir)))


def shot_pool(task: str, data_dir: str | Path | None = None, n: int = 16) -> list[Problem]:
    """The few-shot examples of a word task: ``n`` fixed training problems, never drawn as problems."""
    probs = load_word_task(task, "train", data_dir)
    return random.Random(stable_hash(task)).sample(probs, min(n, len(probs)))
