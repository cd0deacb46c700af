"""Seeded math/logic problem generators, prompt templates and the GSM8K loader.

A :class:`Problem` is template-free: it carries a compact form (``"12 + 7 ="``), a natural
question (``"What is 12 + 7?"``), the gold answer as text (``"19"``), the task name and
metadata. A :class:`Template` turns it into the prompt string for one model family; the
answer continuation is always ``" " + answer`` so that GPT-2-style tokenizers see `` 19``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

TASKS = ("addition", "subtraction", "multiplication", "comparison", "algebra", "logic")


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
          keep: Callable[[Problem], bool]) -> list[Problem]:
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        p = GENERATORS[task](rng)
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
                     tasks: Sequence[str] = TASKS, heldout: bool = True) -> ProblemSet:
    """Draw ``n_train`` + ``n_val`` distinct problems, split evenly over ``tasks``.

    ``heldout=True`` keeps only problems the embedded model was not trained on (see
    :func:`is_heldout`); it costs nothing for other models. Same seed, same problems.
    """
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(GENERATORS)}")
    if not tasks or n_train < 0 or n_val < 0:
        raise ValueError("need at least one task and non-negative problem counts")
    rng = random.Random(seed)
    keep = is_heldout if heldout else (lambda p: True)
    train: list[Problem] = []
    val: list[Problem] = []
    for i, task in enumerate(tasks):
        share = lambda n: n // len(tasks) + (1 if i < n % len(tasks) else 0)  # noqa: E731
        seen: set[str] = set()
        val += _draw(task, share(n_val), rng, seen, keep)
        train += _draw(task, share(n_train), rng, seen, keep)
    return ProblemSet(train, val, seed, tuple(tasks), heldout)


# ----------------------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Template:
    """How problems become prompts for one model family.

    ``style="compact"`` renders ``"12 + 7 ="`` (the embedded model's format).
    ``style="fewshot"`` renders ``n_shots`` solved examples of the same task in a
    ``Q: ...\\nA: ...`` format that GPT-2 and Pythia follow, then the question.
    """

    style: str = "compact"
    n_shots: int = 3
    shot_seed: int = 1234

    def render(self, p: Problem) -> str:
        if self.style == "compact":
            return p.compact
        if self.style == "fewshot":
            rng = random.Random(self.shot_seed + stable_hash(p.task) % 1000)
            shots = []
            while len(shots) < self.n_shots:
                s = GENERATORS[p.task](rng) if p.task in GENERATORS else None
                if s is None:
                    break
                if s.compact != p.compact:
                    shots.append(s)
            body = "".join(f"Q: {s.question}\nA: {s.answer}\n\n" for s in shots)
            return body + f"Q: {p.question}\nA:"
        raise ValueError(f"unknown template style {self.style!r}; use 'compact' or 'fewshot'")

    @staticmethod
    def answer_text(p: Problem) -> str:
        return " " + p.answer


def template_for(model_name: str | None) -> Template:
    """The default template: compact for the embedded model, few-shot for pretrained LMs."""
    return Template("compact") if model_name in (None, "embedded") else Template("fewshot")


# ----------------------------------------------------------------------------- GSM8K

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")


def gsm8k_final_answer(solution: str) -> str:
    """The final answer after ``####`` in a GSM8K solution, commas removed (``"1,200"`` -> ``"1200"``)."""
    m = _GSM_ANSWER.search(solution)
    if not m:
        raise ValueError(f"no '#### N' final answer in GSM8K solution: {solution[-80:]!r}")
    return m.group(1).replace(",", "")


def _gsm_problems(rows: Iterable[dict[str, Any]]) -> list[Problem]:
    out = []
    for i, r in enumerate(rows):
        ans = gsm8k_final_answer(r["answer"])
        q = r["question"].strip()
        out.append(Problem("gsm8k", q + " Answer:", q, ans, {"index": i, "solution": r["answer"],
                                                             "answer_value": float(ans)}))
    return out


def load_gsm8k(split: str = "test", path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """GSM8K problems with their final answers.

    ``path``: a local JSONL file (``{"question", "answer"}`` per line, as in the original
    release) or a folder holding ``{split}.jsonl``. Without ``path`` it uses
    ``datasets.load_dataset("openai/gsm8k", "main")``, which needs the hub or its cache;
    offline it fails with a message that says to pass ``path``.
    """
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"GSM8K file {path} not found; pass the path of a JSONL file "
                                    "with 'question' and 'answer' fields")
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset("openai/gsm8k", "main", split=split))
        except Exception as e:  # offline, no cache
            raise RuntimeError(
                "could not load GSM8K from the Hugging Face hub (offline and not cached?): "
                f"{type(e).__name__}: {e}. Pass path= to a local GSM8K JSONL file instead."
            ) from e
    if limit is not None:
        rows = rows[:limit]
    return _gsm_problems(rows)
