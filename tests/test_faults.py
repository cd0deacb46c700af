"""Faults on purpose (issue 12): every case ends in recomputation to the content of a clean run,
or in a clear refusal, with nothing lost. Embedded model, tiny counts, Phases 1-2 only."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from so2lib.phases import effects, selection, study
from so2lib.runs import runner
from so2lib.runs.params import ParameterError, validate
from so2lib.runs.rundir import (DamagedArtifact, expect_rows, MissingArtifact, Run, RunInUse, RunLock, StaleArtifact,
                         content_hash)

KW = dict(n_train=120, n_val=60, seed=0, device="cpu", batch_size=16, progress=False)


def phases(run_dir, top_n=5, by="combined", batch_size=16):
    setup = study.open_run(str(run_dir), None, **(KW | {"batch_size": batch_size}))
    selection.setup_and_selection(setup, top_k_layers=2, top_n_neurons=top_n, select_by=by, progress=False)
    effects.second_order_phase(setup, progress=False)
    return setup


def arrays(run):
    crit, _ = selection.load_selection(run)
    names = ["second_ld", "second_cd", "direct_ld", "direct_cd"] + [f"vectors_L{l}" for l in crit]
    return {f"{s}_{k}": np.array(effects.load_effects(run, s, k)) for s in ("train", "val") for k in names}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A finished clean run (the reference) and a copy of its directory for each test to damage."""
    d = tmp_path_factory.mktemp("clean") / "r"
    setup = phases(d)
    return d, setup, arrays(setup.run)


@pytest.fixture
def copy(clean, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(clean[0], d, ignore=shutil.ignore_patterns(".lock"))
    return d


def same_as_clean(run, ref, exact=True, approx=lambda k: False):
    """Equal to the clean run's arrays: bit for bit, or (``exact=False``: rows recomputed in other
    batches, whose padding changes float rounding; or the arrays ``k`` with ``approx(k)``) to
    float32/float16 rounding."""
    got = arrays(run)
    assert got.keys() == ref.keys()
    for k in ref:
        if exact and not approx(k):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k].astype(np.float32), ref[k].astype(np.float32),
                                       rtol=1e-3, atol=1e-6, err_msg=k)


def test_two_clean_runs_have_identical_content(clean, tmp_path):
    d, setup, ref = clean
    other = Run(phases(tmp_path / "again").run.path)
    for name, entry in setup.run.manifest["artifacts"].items():
        assert other.manifest["artifacts"][name]["hash"] == entry["hash"], name


def test_artifacts_are_0644(clean):
    d = clean[0]
    for f in d.iterdir():
        if f.is_file() and not f.name.startswith("."):
            assert f.stat().st_mode & 0o777 == 0o644, f.name


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_damaged_effect_array_is_detected_and_recomputed(clean, copy, damage):
    _, _, ref = clean
    f = copy / "val_second_ld.npy"
    size = f.stat().st_size
    if damage == "truncate":
        with open(f, "r+b") as h:
            h.truncate(size // 2)
    else:  # zero the data, keep the header and the size
        with open(f, "r+b") as h:
            h.seek(size // 2)
            h.write(b"\0" * (size - size // 2))
    run = Run(copy)
    with pytest.raises(DamagedArtifact, match="re-run notebook 02"):
        effects.load_effects(run, "val", "second_ld")
    phases(copy)  # the re-run recomputes the damaged rows only
    same_as_clean(Run(copy), ref)


def test_resume_with_another_batch_size(clean, copy, tmp_path):
    """Issue 21: rows of two batchings were mixed. Now the batch size is part of every step's
    input key: the resume with 7 recomputes what 16 computed and equals a clean bs-7 run to the
    bit, and every artifact records the batch size it was computed with."""
    _, setup, ref = clean
    for f in copy.glob("*.npy"):
        if f.name.startswith(("train_", "val_")) and "rows" not in f.name:
            with open(f, "r+b") as h:  # an interrupted stream: the last third of the rows is lost
                h.truncate(f.stat().st_size * 2 // 3)
    phases(copy, batch_size=7)
    fresh7 = Run(phases(tmp_path / "fresh7", batch_size=7).run.path)
    same_as_clean(Run(copy), arrays(fresh7))  # exact
    got = Run(copy).manifest["artifacts"]
    for name in ("labels_val", "selection", "train_vectors_L0" if "train_vectors_L0" in got else "val_direct_cd"):
        assert got[name]["params"]["batch_size"] == 7, name
        assert got[name]["hash"] == fresh7.manifest["artifacts"][name]["hash"], name
    # planted: the bs-16 reference differs from bs 7 somewhere, so mixing would have been caught
    assert any(not np.array_equal(ref[k], arrays(fresh7)[k]) for k in ref)


@pytest.mark.parametrize("change", [dict(top_n=3), dict(by="variance")])
def test_changed_selection_parameter_recomputes_the_vectors(clean, copy, tmp_path, change):
    phases(copy, **change)
    fresh = tmp_path / "fresh"
    phases(fresh, **change)
    run, other = Run(copy), Run(fresh)
    assert selection.load_selection(run) == selection.load_selection(other)
    assert run.load("labels_train").equals(other.load("labels_train"))
    d_copy, d_fresh = (r.load("correctness_direction")["d"] for r in (run, other))
    if torch.equal(d_copy, d_fresh):
        same_as_clean(run, arrays(other))
    else:
        # Rare and not yet explained (1 CI run; 1 of 14 local module runs in session 31, 0 of 31 in
        # session 32, idle or loaded): the fresh run's refit of d differed in float rounding from
        # the clean run's, which the copy reuses. Only the *_cd arrays read d; everything else
        # (selection, vectors, the logit difference) must still be equal bit for bit.
        torch.testing.assert_close(d_copy, d_fresh, rtol=1e-5, atol=1e-7)
        warnings.warn(f"correctness directions of two runs differ (max abs {float((d_copy - d_fresh).abs().max()):.3g})",
                      RuntimeWarning)  # not a UserWarning: pyproject ignores those
        same_as_clean(run, arrays(other), approx=lambda k: k.endswith("_cd"))
    for name in ("selection", "val_second_ld", "train_vectors_L0" if "train_vectors_L0" in run.manifest["artifacts"]
                 else "val_direct_ld"):
        assert run.manifest["artifacts"][name]["hash"] == other.manifest["artifacts"][name]["hash"]


def test_changed_parameter_then_skipped_notebook_is_refused(clean, copy):
    setup = study.open_run(str(copy), None, **KW)
    selection.setup_and_selection(setup, top_k_layers=2, top_n_neurons=3, progress=False)
    with pytest.raises(StaleArtifact, match="top_n_neurons=3.*re-run notebook 02"):
        effects.load_effects(Run(copy), "val", "second_ld")


@pytest.mark.parametrize("name,damage", [("labels_val", b"PAR1garbage"), ("correctness_direction", b"\x80junk"),
                                         ("selection", b"{\"critical_layers\": [0,"),
                                         ("problems", b"[]")])
def test_damaged_step_artifact_is_recomputed(clean, copy, name, damage):
    _, setup, ref = clean
    entry = setup.run.manifest["artifacts"][name]
    (copy / entry["file"]).write_bytes(damage)
    with pytest.raises(DamagedArtifact, match=name):
        Run(copy).load(name)
    phases(copy)
    run = Run(copy)
    assert run.manifest["artifacts"][name]["hash"] == entry["hash"]
    same_as_clean(run, ref)


def test_damaged_artifact_that_is_not_a_step_names_the_recovery(tmp_path):
    run = Run(tmp_path)
    run.save("validation_table", pd.DataFrame({"a": [1.0, 2.0]}), "03")
    (tmp_path / "validation_table.parquet").write_bytes(b"PAR1")
    with pytest.raises(DamagedArtifact, match="re-run notebook 03_characterization"):
        run.load("validation_table")


def test_missing_artifact_names_its_notebook(tmp_path):
    run = Run(tmp_path)
    with pytest.raises(MissingArtifact, match="run notebook 01_setup_and_selection first"):
        run.load("selection")
    with pytest.raises(MissingArtifact, match="run notebook 02_second_order_effects first"):
        effects.load_effects(run, "val", "second_ld")
    with pytest.raises(MissingArtifact, match="run notebook 03_characterization first"):
        run.load("layer_sums_val")


def test_poisoned_cache_is_refused_and_never_saved(clean, copy):
    with pytest.raises(ValueError, match="batch_size"):
        study.open_run(str(copy), None, **(KW | {"batch_size": -4}))
    # an empty label table is never cached...
    empty = Run(copy.parent / "empty")
    with pytest.raises(ValueError, match="expected a table of 60 rows"):
        empty.step("labels_val", lambda: pd.DataFrame(), "01", validate=expect_rows(60, ["correct"]))
    assert not empty.has("labels_val")
    # ...and one already cached (as an older version did) is recomputed
    run = Run(copy)
    key = run.key_for("labels_val", None, ["problems"])
    run.save("labels_val", pd.DataFrame({"x": []}), "01", key=key)  # poison as an old version would
    setup = study.open_run(str(copy), None, **KW)
    assert len(setup.labels["val"]) == 60 and "correct" in setup.labels["val"]


@pytest.mark.parametrize("params,match", [
    ({"n_trian": 30}, "unknown parameter 'n_trian'.*n_train"),
    ({"batch_size": -4}, "batch_size=-4 is not valid"),
    ({"batch_size": "big"}, "wrong type"),
    ({"n_val": 1}, "n_val=1 is not valid: it must be an integer >= 30"),
    ({"n_train": 10}, "n_train=10 is not valid: it must be an integer >= 50"),
    ({"select_by": "loudness"}, "select_by='loudness'"),
    ({"run_dir": "x"}, "set by the runner"),
    ({"chat": "off"}, "chat='off' is not valid"),
    ({"position": "last"}, "position='last' is not valid"),
])
def test_invalid_parameters_are_refused_before_any_work(tmp_path, params, match):
    with pytest.raises(ParameterError, match=match):
        runner.run_all(str(tmp_path / "r"), params=params)
    assert not (tmp_path / "r").exists()  # nothing was started


def test_parameter_checks_are_generic():
    declared = {"nb": {"tasks": ["addition"], "n_shots": 3, "template": None, "chat": False, "share": 0.02}}
    validate({"tasks": ["addition", "logic"], "n_shots": 0, "template": "fewshot", "chat": True}, declared)
    for bad, match in [({"tasks": ["comparisonn"]}, "task names"), ({"n_shots": -1}, "n_shots"),
                       ({"chat": "yes"}, "chat='yes' is not valid"), ({"template": "weird"}, "template")]:
        with pytest.raises(ParameterError, match=match):
            validate(bad, declared)


def test_notebook_parameters_are_read_from_the_notebooks():
    declared = runner.declared_parameters(runner.notebooks())
    assert declared["01_setup_and_selection.ipynb"]["top_n_neurons"] == 100
    assert all("run_dir" in ps for ps in declared.values())


def test_concurrent_runner_is_refused_and_stale_lock_taken_over(tmp_path):
    d = tmp_path / "r"
    code = ("import sys, time; from so2lib.runs.rundir import RunLock; l = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True,
                         env=os.environ | {"PYTHONPATH": os.getcwd()})
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=f"in use by PID {p.pid}"):
            runner.run_all(str(d), only=["01"])
        with pytest.raises(RunInUse, match=f"in use by PID {p.pid}"):
            Run(d)  # a notebook opened by hand is refused too
    finally:
        p.kill()
        p.wait()
    # the holder died: its lock file stays behind and is taken over
    assert json.loads((d / ".lock").read_text())["pid"] == p.pid
    with RunLock(d):
        assert json.loads((d / ".lock").read_text())["pid"] == os.getpid()
        Run(d)  # the holder itself may open it


def test_concurrent_manifest_updates_are_not_lost(tmp_path):
    a, b = Run(tmp_path), Run(tmp_path)
    a.save("x", {"v": 1}, "01")
    b.save("y", {"v": 2}, "01")  # b never saw x
    assert set(Run(tmp_path).manifest["artifacts"]) == {"x", "y"}


def test_content_hash_ignores_file_bytes(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3), "df": pd.DataFrame({"a": [1, 2]})}
    run = Run(tmp_path)
    run.save("t", t)
    h1 = run.manifest["artifacts"]["t"]["hash"]
    run.save("t", {"w": torch.arange(6.0).reshape(2, 3).clone(), "df": pd.DataFrame({"a": [1, 2]})})
    assert run.manifest["artifacts"]["t"]["hash"] == h1 == content_hash(run.load("t"))
    assert content_hash(torch.zeros(3)) != content_hash(torch.zeros(3, dtype=torch.float64))


def _reference_hash(obj):
    """content_hash as it was first written: one update per piece (the recorded hashes' definition)."""
    import hashlib
    import json

    from so2lib.runs.rundir import _hash_array

    def into(h, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.dtype in (torch.bfloat16,) or t.dtype.is_complex:
                t = t.reshape(-1).view(torch.uint8)
            h.update(t.numpy().tobytes())
        elif isinstance(obj, np.ndarray):
            _hash_array(h, obj)
        elif isinstance(obj, pd.DataFrame):
            h.update(f"frame|{list(map(str, obj.columns))}|{[str(d) for d in obj.dtypes]}|".encode())
            h.update(pd.util.hash_pandas_object(obj, index=True).values.tobytes())
        elif isinstance(obj, dict):
            h.update(f"dict|{len(obj)}|".encode())
            for k in sorted(obj, key=str):
                into(h, str(k))
                into(h, obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"seq|{len(obj)}|".encode())
            for v in obj:
                into(h, v)
        elif isinstance(obj, np.generic):
            into(h, obj.item())
        elif obj is None or isinstance(obj, (str, int, float, bool)):
            h.update(f"{type(obj).__name__}|{json.dumps(obj)}|".encode())
        elif hasattr(obj, "__dict__"):
            h.update(f"obj|{type(obj).__qualname__}|".encode())
            into(h, vars(obj))
        else:
            h.update(f"repr|{obj!r}|".encode())
    h = hashlib.blake2b(digest_size=16)
    into(h, obj)
    return h.hexdigest()


def test_content_hash_equals_its_reference_definition():
    import collections
    import enum

    class Kind(enum.IntEnum):
        A = 3

    class Obj:
        def __init__(self):
            self.a, self.b = [1, 2.5], "x"
    objs = [
        {"b": [1, 2.0, -0.0, 1e300, float("nan"), float("inf"), -float("inf"), True, False, None, "é\n\"q\"", "🙂"],
         "a": {"nested": (1, "t", [np.float64(0.1), np.int64(7), np.bool_(True)]), 3: "int key"},
         "t": torch.arange(4.0), "arr": np.arange(6).reshape(2, 3), "df": pd.DataFrame({"c": [1.5, 2.5]})},
        [{"task": "addition", "a": 12, "b": 30, "answer": "42", "meta": {"digits": 2, "carry": False}}] * 50,
        collections.OrderedDict(z=1, y=[Kind.A, np.str_("s")]), Obj(), (), {}, "", 0, 0.1, None,
        {"mix": [torch.zeros(2, dtype=torch.bfloat16), "after a tensor", 3, {"d": np.float32(2.5)}]},
    ]
    for o in objs:
        assert content_hash(o) == _reference_hash(o), o
    # and it still tells contents apart
    assert content_hash({"a": 1}) != content_hash({"a": 1.0}) != content_hash({"a": "1"})
    assert content_hash([1, [2]]) != content_hash([[1], 2])


def test_failed_notebook_keeps_the_good_copy_and_the_times(tmp_path, monkeypatch):
    import papermill as pm

    d = tmp_path / "r"
    out = d / "notebooks"
    out.mkdir(parents=True)
    (out / "02_second_order_effects.ipynb").write_text("good copy of an earlier run")

    def fake(src, dst, **kw):
        from pathlib import Path
        Path(dst).write_text("partial " + Path(src).name)
        if Path(src).name.startswith("02"):
            raise pm.PapermillExecutionError(0, 1, "", "ValueError", "boom", [])

    monkeypatch.setattr(pm, "execute_notebook", fake)
    with pytest.raises(runner.NotebookFailed, match="02_second_order_effects.ipynb failed.*boom"):
        runner.run_all(str(d), only=["01", "02", "03"])
    assert (out / "02_second_order_effects.ipynb").read_text() == "good copy of an earlier run"
    assert (out / "02_second_order_effects.failed.ipynb").read_text().startswith("partial")
    assert (out / "01_setup_and_selection.ipynb").exists()
    m = Run(d).manifest
    assert set(m["notebook_seconds"]) == {"01_setup_and_selection.ipynb", "02_second_order_effects.ipynb"}
    assert m["notebook_status"]["02_second_order_effects.ipynb"] == "failed"
    assert not any(p.name.endswith(".running.ipynb") for p in out.iterdir())


def test_chat_and_position_values_a_user_may_give_are_accepted():
    from so2lib.runs.params import check_value
    for v in ("auto", True, False):
        assert check_value("chat", v) is None
    assert check_value("position", "first") is None and check_value("chat", 1)


# ----------------------------------------------------------------------------- issue 21: API misuse


def test_api_misuse_gets_errors_that_say_what_to_do(tiny_models):
    import so2lib
    from so2lib.data.tasks import make_problem_set

    model = tiny_models["gpt2"]
    tokens, pos = torch.tensor([[1, 2, 3, 4]]), torch.tensor([3])
    ok = so2lib.second_order_effects(model, tokens, pos, layer=1, neurons=[0, 1])
    # a numpy (or 0-d torch) integer layer is the same layer, not "out of range"
    assert torch.equal(so2lib.second_order_effects(model, tokens, pos, layer=np.int64(1), neurons=[0, 1]), ok)
    assert torch.equal(so2lib.second_order_effects(model, tokens, pos, layer=torch.tensor(1), neurons=[0, 1]), ok)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        so2lib.second_order_effects(model, tokens, pos, layer=np.int64(9))
    with pytest.raises(TypeError, match="layer must be an integer"):
        so2lib.second_order_effects(model, tokens, pos, layer=1.5)
    # a model name instead of a model
    with pytest.raises(TypeError, match=r"load it first with model = so2lib.load_model\('gpt2'\)"):
        so2lib.second_order_effects("gpt2", tokens, pos, layer=1)
    with pytest.raises(TypeError, match=r"so2lib.load_model\('gpt2'\)"):
        so2lib.projected_effects("gpt2", tokens, pos, torch.zeros(1, model.cfg.d_model))
    out = so2lib.projected_effects(model, tokens, pos, torch.ones(1, model.cfg.d_model), layers=np.int64(1))
    assert out["second"].shape[2] == 1
    # batch_size 0
    enc = so2lib.encode(model, make_problem_set(4, 2, 0, ["addition"]).train)
    for bs in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            so2lib.label(model, enc, bs)
    with pytest.raises(TypeError, match="so2lib.encode"):
        so2lib.label(model, [[1, 2]], 4)


# ----------------------------------------------------------------------------- issue 21: run directories


def test_run_dir_that_is_a_file_or_under_a_file_is_refused_clearly(tmp_path):
    from so2lib.runs.rundir import RunDirUnusable

    f = tmp_path / "afile"
    f.write_text("x")
    for d, match in [(f, "is a file, not a folder: pass another run directory"),
                     (f / "sub" / "r", f"cannot be created: {f} is a file")]:
        with pytest.raises(RunDirUnusable, match=match):
            runner.run_all(str(d), only=["01"])
        with pytest.raises(RunDirUnusable, match=match):
            Run(d)
    assert f.read_text() == "x"


@pytest.fixture
def readonly(tmp_path):
    """``(src, ro)``: a folder and a read-only view of it (a read-only bind mount as root, else
    permissions)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True).returncode:
            pytest.skip("root without mount: cannot make a read-only folder")
        mounted = True
    else:
        ro.rmdir()
        ro = src
    yield src, ro
    if mounted:
        subprocess.run(["umount", str(ro)], check=True)
    else:
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_finished_run_is_read_from_read_only_storage(readonly):
    from so2lib.runs.rundir import RunDirUnusable

    src, ro = readonly
    run = Run(src / "r", model="m")
    run.step("table", lambda: pd.DataFrame({"a": [1.0, 2.0]}), "01")
    before = (src / "r" / "manifest.json").read_bytes()
    if ro == src:
        for p in [*src.rglob("*"), src]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    r = Run(ro / "r")  # opening only reads...
    assert r.load("table").a.tolist() == [1.0, 2.0]
    assert r.step("table", lambda: 1 / 0, "01").a.tolist() == [1.0, 2.0]  # a finished step loads
    assert (src / "r" / "manifest.json").read_bytes() == before  # ...and rewrites nothing
    with pytest.raises(RunDirUnusable, match="is read-only.*copy the folder to writable storage"):
        runner.run_all(str(ro / "r"), only=["01"])
    with pytest.raises(RunDirUnusable, match="is read-only"):
        r.save("other", {"x": 1})


def test_reopening_a_run_does_not_rewrite_its_manifest(tmp_path):
    run = Run(tmp_path / "r", model="m")
    run.save("x", {"v": 1}, "01")
    before = (tmp_path / "r" / "manifest.json").stat().st_mtime_ns, (tmp_path / "r" / "manifest.json").read_bytes()
    Run(tmp_path / "r").load("x")
    Run(tmp_path / "r", model="m")  # the same config: nothing to write
    after = (tmp_path / "r" / "manifest.json").stat().st_mtime_ns, (tmp_path / "r" / "manifest.json").read_bytes()
    assert before == after


def test_truncated_manifest_is_refused_before_any_notebook(tmp_path, monkeypatch):
    import papermill as pm

    d = tmp_path / "r"
    Run(d).save("x", {"v": 1}, "01")
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[:len(text) // 2])
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(DamagedArtifact, match="manifest.json is damaged.*Restore it, or start again"):
        runner.run_all(str(d), only=["01"])
    p = subprocess.run([sys.executable, "-m", "so2lib.runs.runner", "--run-dir", str(d), "--only", "01"],
                       capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert p.returncode == 1 and "Traceback" not in p.stderr and "manifest.json is damaged" in p.stderr
    assert (d / "x.json").exists()  # nothing computed is lost


def test_disk_full_while_papermill_saves_is_said_plainly(tmp_path, monkeypatch):
    import errno

    import papermill as pm
    from so2lib.runs.rundir import RunDirUnusable

    d = tmp_path / "r"
    state = {"full": False}

    def fake(src, dst, **kw):
        from pathlib import Path
        if Path(src).name.startswith("02"):
            state["full"] = True
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        Path(dst).write_text("ok")
    real_update = Run._update

    def update(self, change):  # the disk stays full: the manifest cannot be written either
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest_path))
        return real_update(self, change)

    monkeypatch.setattr(pm, "execute_notebook", fake)
    monkeypatch.setattr(Run, "_update", update)
    with pytest.raises(RunDirUnusable, match=r"disk full at .*02_second_order_effects.*free space and run "
                                             r"again; nothing computed is lost"):
        runner.run_all(str(d), only=["01", "02"])
    assert (d / "notebooks" / "01_setup_and_selection.ipynb").read_text() == "ok"


# ----------------------------------------------------------------------------- issue 21: model folders, data


def test_incomplete_or_damaged_model_folder_says_what_to_do(tmp_path):
    from so2lib.data.embedded import EMBEDDED_DIR
    from so2lib.engine.models import load_model

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(EMBEDDED_DIR / "config.json", only_config)
    with pytest.raises(FileNotFoundError, match="holds config.json but no weights.*incomplete") as e:
        load_model(only_config, device="cpu")
    assert "hub" not in str(e.value) and "huggingface-cli" not in str(e.value)
    damaged = tmp_path / "damaged"
    shutil.copytree(EMBEDDED_DIR, damaged)
    raw = bytearray((damaged / "model.safetensors").read_bytes())
    raw[100:400] = b"x" * 300  # the header is garbage
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=r"weights in folder .*damaged \(truncated or corrupt file\).*"
                                           r"Copy or download the model's files") as e:
        load_model(damaged, device="cpu")
    assert "hub" not in str(e.value)
    (damaged / "model.safetensors").write_bytes(bytes(raw[:1000]))  # truncated
    with pytest.raises(RuntimeError, match="damaged"):
        load_model(damaged, device="cpu")


def test_word_task_without_data_names_SO2LIB_DATA_and_the_layout(tmp_path, monkeypatch):
    from so2lib.data import tasks

    monkeypatch.setenv("SO2LIB_DATA", str(tmp_path / "nodata"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub: offline
    tasks._load_cached.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"SO2LIB_DATA.*gsm8k/train.jsonl \+ gsm8k/test.jsonl"):
        tasks.make_problem_set(60, 30, 0, ["gsm8k"])
    with pytest.raises(FileNotFoundError, match=r"SO2LIB_DATA.*svamp/SVAMP.json"):
        tasks.make_problem_set(60, 30, 0, ["svamp"])


# ----------------------------------------------------------------------------- issue 21: silent wrong


def test_weights_changed_in_place_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from so2lib.data.embedded import EMBEDDED_DIR

    monkeypatch.setenv("SO2LIB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR, folder)
    d = tmp_path / "r"
    setup = study.open_run(str(d), str(folder), **KW, template="compact")
    assert setup.run.manifest["config"]["weights"]
    # the same weights in another place are the same model
    shutil.copytree(folder, tmp_path / "model2")
    from so2lib.data.sources import weights_fingerprint
    assert weights_fingerprint(tmp_path / "model2") == setup.run.config["weights"]
    study.open_run(str(d), str(folder), **KW, template="compact")  # unchanged: resumes
    # a fine-tuned checkpoint saved over the old one
    sd = load_file(folder / "model.safetensors")
    name = next(k for k in sd if sd[k].dim() == 2)
    sd[name] = sd[name] * 1.01
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    labels_before = (d / "labels_val.parquet").read_bytes()
    with pytest.raises(ValueError, match=r"weights of model .* changed since run .* was made.*Use another run "
                                         r"directory for the new weights"):
        study.open_run(str(d), str(folder), **KW)
    assert (d / "labels_val.parquet").read_bytes() == labels_before  # nothing computed is lost
    study.open_run(str(tmp_path / "new"), str(folder), **KW, template="compact")  # another directory is fine


def test_a_problem_set_that_drops_a_task_does_not_bind_the_directory(tmp_path):
    d = tmp_path / "r"
    # the embedded model's context (64 tokens) is shorter than any few-shot prompt
    with pytest.raises(ValueError, match=r"kept no problem.*too_long.*n_shots=0.*-p n_shots 0.*template='compact'"
                                         r".*Nothing was saved: run again in the same run directory"):
        study.open_run(str(d), None, **KW, template="fewshot", n_shots=3)
    assert not Run(d).has("problems")
    # following the error's advice in the same directory works
    setup = study.open_run(str(d), None, **KW, template="compact")
    assert setup.run.manifest["data"]["n_val"] == 60


def test_reopening_with_another_batch_size_recomputes_instead_of_mixing(clean, copy):
    d, setup, ref = clean
    s7 = study.open_run(str(copy), None, **(KW | {"batch_size": 7}))
    m = s7.run.manifest
    assert "batch_size" not in m["config"]
    # labels computed with 16 are not passed off as computed with 7: they were recomputed with 7
    assert m["artifacts"]["labels_val"]["params"]["batch_size"] == 7
    assert setup.run.manifest["artifacts"]["labels_val"]["params"]["batch_size"] == 16
    assert m["artifacts"]["val_second_ld"]["params"]["batch_size"] == 16  # not recomputed yet
    assert "batch_size" not in m["artifacts"]["problems"]["params"]  # no batched pass: kept, not recomputed
    assert m["artifacts"]["problems"]["written"] == setup.run.manifest["artifacts"]["problems"]["written"]
    with pytest.raises(StaleArtifact, match="batch_size=7"):  # ...and refused: its inputs changed
        effects.load_effects(s7.run, "val", "second_ld")


def test_notebook_run_by_hand_refuses_what_the_runner_refuses(tmp_path):
    import papermill as pm

    from so2lib.runs.rundir import NOTEBOOKS_DIR

    d = tmp_path / "r"
    with pytest.raises(pm.PapermillExecutionError, match="n_val=1 is not valid: it must be an integer >= 30"):
        pm.execute_notebook(str(NOTEBOOKS_DIR / "01_setup_and_selection.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"run_dir": str(d), "n_val": 1, "device": "cpu"}, cwd=str(NOTEBOOKS_DIR),
                            progress_bar=False)
    assert not Run(d).has("problems")
    # a parameter open_run does not take is checked in the notebook's namespace
    with pytest.raises(pm.PapermillExecutionError, match="significant_share=1.5 is not valid"):
        pm.execute_notebook(str(NOTEBOOKS_DIR / "03_characterization.ipynb"), str(tmp_path / "out3.ipynb"),
                            parameters={"run_dir": str(d), "significant_share": 1.5, "device": "cpu"},
                            cwd=str(NOTEBOOKS_DIR), progress_bar=False)
    for bad, match in [({"batch_size": 0}, "batch_size=0"), ({"position": "last"}, "position='last'"),
                       ({"tasks": ["additionn"]}, "task names"), ({"n_train": 10}, "n_train=10")]:
        with pytest.raises(ParameterError, match=match):
            study.open_run(str(d), None, **(KW | bad))


# ----------------------------------------------------------------------------- issue 21: the terminal summary


def _verdict_frame():
    from so2lib.stats import TABLE_COLUMNS

    rows = [
        {"measure": "second-order effects of selected neurons beat matched random neurons " * 2, "measured": 0.1234,
         "ci_low": 0.05, "ci_high": 0.2, "control": 0.01, "target": 0.0, "verdict": "established", "mde": float("nan"),
         "resampled": "problems", "split": "validation", "primary": True, "p": 0.001, "p_holm": 0.004,
         "how": "a very long explanation of how this was measured " * 10},
        {"measure": "rank-1 recovery", "measured": 0.41, "ci_low": -0.2, "ci_high": 0.9, "control": 0.5,
         "target": 0.5, "verdict": "inconclusive", "mde": 0.312, "resampled": "problems", "split": "training",
         "primary": False, "p": 0.3, "p_holm": float("nan"), "how": "x " * 300},
        {"measure": "sparsity", "measured": float("nan"), "verdict": "not testable", "how": "no drop"},  # odd row
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def test_end_of_run_summary_fits_100_columns_and_keeps_the_verdicts():
    from so2lib.views.report import Section
    from so2lib.views.summary import compact_text

    wide = pd.DataFrame({f"column_{i}_with_a_long_name": [f"value {i} " * 8] for i in range(12)})
    secs = [Section("Validation table", "s", tables=[("", _verdict_frame())]),
            Section("Applications", "s", tables=[("Editing", wide), ("Empty", pd.DataFrame())],
                    notes=["a note " * 40])]
    text = compact_text(secs)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    head = next(l for l in lines if l.startswith("measure"))
    assert head.split() == ["measure", "estimate", "interval", "control", "verdict"]
    assert "a very long explanation" not in text and "docs/measurements.md" in text
    assert any("established" in l and "0.123" in l and "[0.05, 0.2]" in l for l in lines)
    assert any("rank-1 recovery [train]" in l and "inconclusive (mde 0.312)" in l for l in lines)
    assert any(l.startswith("sparsity") and "not testable" in l for l in lines)
    assert "also in report.html: column_" in text
    # the planted check can fail: the old text summary printed the 'how' column at full width
    old = "\n".join(df.to_string(index=False) for _, df in secs[0].tables)
    assert max(map(len, old.splitlines())) > 100


def test_report_prints_the_compact_summary(tmp_path, capsys):
    from so2lib.views.report import write_report

    run = Run(tmp_path / "r")
    run.record("model", {"name": "tiny", "n_layers": 4, "d_model": 8, "d_mlp": 16})
    run.save("validation_table", _verdict_frame())
    write_report(run)
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100 and "inconclusive (mde 0.312)" in out


# ----------------------------------------------------------------------------- issue 21: Ctrl-C


def _children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _artifact_hashes(d):
    m = json.loads((d / "manifest.json").read_text())
    return {k: v["hash"] for k, v in m["artifacts"].items() if k != "report"}


def test_ctrl_c_stops_the_run_keeps_what_finished_and_the_resume_is_exact(tmp_path):
    import re
    import signal
    import time

    # enough problems that notebook 02 is still computing when Ctrl-C arrives (with the shared kernel
    # it takes about 3 s at 50 + 30 problems)
    params = ["-p", "n_train", "200", "-p", "n_val", "30", "-p", "batch_size", "4", "-p", "top_n_neurons", "3",
              "-p", "top_k_layers", "1", "-p", "zero_ablation", "false", "-p", "device", "cpu"]
    env = os.environ | {"PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}

    def start(d):
        return subprocess.Popen([sys.executable, "-m", "so2lib.runs.runner", "--run-dir", str(d), "--only", "01", "02",
                                 *params], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group, as a terminal gives it

    clean_p = start(tmp_path / "clean")  # the reference, uninterrupted
    d = tmp_path / "r"
    p = start(d)
    seen = []
    try:
        for line in p.stdout:  # wait until notebook 02 is computing its effect arrays
            seen.append(line)
            if re.search(r"\[02\] effects \(train\): \d+ of \d+ problems to compute", line):
                break
        else:
            pytest.fail("the run ended before notebook 02 computed effects:\n" + "".join(seen) + p.stderr.read())
        time.sleep(0.3)
        kernels = _children(p.pid)
        t0 = time.perf_counter()
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in the terminal
        out, err = p.communicate(timeout=30)
        stopped = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"SIGINT to exit: {stopped:.2f} s")
    assert stopped < 10, stopped
    assert p.returncode == 130, err
    assert "interrupted (Ctrl-C) during notebook 02_second_order_effects.ipynb" in err
    assert "every finished step is kept" in err and "Traceback" not in err
    resume = err.split("resume with the same command (finished steps are loaded, not recomputed):\n", 1)[1].strip()
    assert resume.split() == [sys.executable, "-m", "so2lib.runs.runner", "--run-dir", str(d), "--only", "01", "02",
                              *params]
    time.sleep(2)
    assert not [k for k in kernels if os.path.exists(f"/proc/{k}")], "a kernel outlived the run"
    m = json.loads((d / "manifest.json").read_text())
    assert m["notebook_status"] == {"01_setup_and_selection.ipynb": "ok", "02_second_order_effects.ipynb": "interrupted"}
    assert {"problems", "labels_train", "labels_val", "selection"} <= set(m["artifacts"])
    # the resume, exactly as printed
    again = subprocess.run(resume, shell=True, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "problems ..." not in again.stdout  # notebook 01's steps were loaded, not recomputed
    assert clean_p.wait(timeout=900) == 0, clean_p.stderr.read()[-3000:]
    ref, got = _artifact_hashes(tmp_path / "clean"), _artifact_hashes(d)
    assert got.keys() == ref.keys()
    assert {k for k in ref if got[k] != ref[k]} == set()
