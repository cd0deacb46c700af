"""Phase 3's verdict rows (``validation_table`` of notebook 03), each testing an estimate against
the strongest alternative explanation, with intervals that resample validation PROBLEMS.

- **CLIP sparsity** (:func:`clip_sparsity_rows`): ``drop(ablate significant) / drop(mean)`` (CLIP:
  most of the drop) and ``drop(ablate insignificant) / drop(mean)`` (CLIP: little of it), from the
  per-problem outcomes of the CLIP protocol (:func:`protocol.run_protocol`), ratio recomputed per
  bootstrap replicate; for the critical layers each replicate also reads one of the protocol's
  refits of the training fit (:func:`drop_ratio` with ``refits``).
- **Rank-1 beyond its controls** (:func:`rank1_rows`): the share of the mean-ablation drop that
  rank-1 onto PC1 recovers, minus the share recovered by rank-1 onto a random unit direction in
  each neuron's span, and onto the neuron's mean-effect direction (intervals refitted the same way).
- **PC1 structure** (:func:`structure_arrays`, :func:`structure_rows`): the validation share of
  each neuron's centred effect energy along its training PC1, minus the same along its
  mean-effect direction, along another neuron's PC1, and along the PC1 of an activation-only
  null; and its ratio to the validation set's own PC1 (the ceiling). The difference rows' intervals
  refit the training fits (:func:`structure_refits`: each replicate resamples validation problems
  and uses a refit on a bootstrap resample of the training problems).
- **Energy share** (:func:`energy_share_row`): a description beside a heavy-tailed (Laplace) null.
- **Layer concentration** (:func:`concentration_row`): the share of the second-order ablation drop
  in the layers chosen by second-order ablation on training.

Every function here is pure (numpy / torch on CPU arrays); nothing touches a model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from so2lib.phases.linalg import float32_mean, map_replicates
from so2lib.stats import describe, interval_row, not_measurable, top_share

PROBLEMS = "problems (validation)"
#: the resampling unit of rows whose intervals also refit the training fits
PROBLEMS_REFIT = "problems (validation; training fits refitted)"


def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _stack(per: Sequence[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([np.asarray(p[key], float) for p in per], 1)  # [N, m]


# ----------------------------------------------------------------------------- ratios of drops


def drop_ratio(a: np.ndarray, b: np.ndarray, clean: np.ndarray, mean: np.ndarray, n_boot: int = 2000,
               seed: int = 0, refits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
               ) -> dict[str, Any]:
    """``sum_j mean_i (a_ij - b_ij) / sum_j mean_i (clean_ij - mean_ij)`` over problems ``i`` (and
    pooled layers ``j``: arrays ``[N]`` or ``[N, m]``, the same problems in every column), with its
    problem-bootstrap replicates (numerator and denominator recomputed on the same resample).
    ``refits``: the same ``(a, b, mean)`` from ``R`` refits of the training fit on bootstrap
    resamples of the training problems; replicate ``r`` then reads refit ``r mod R`` on its
    validation resample, so the interval also carries the training fit's variability.

    Returns ``point``, ``boots``, the mean-ablation ``drop`` (summed over ``j``) with its
    bootstrap interval ``drop_ci``, and ``testable`` (the drop's interval excludes 0: there is a
    drop to share out)."""
    a, b, c, m = (np.asarray(x, float).reshape(len(x), -1) for x in (a, b, clean, mean))
    num, den = (a - b).sum(1), (c - m).sum(1)
    idx = _boot_idx(len(num), n_boot, seed)
    if refits:
        nums = np.stack([(np.asarray(ar, float).reshape(len(c), -1) - np.asarray(br, float).reshape(len(c), -1)).sum(1)
                         for ar, br, _ in refits])  # [R, N]
        dens = np.stack([(c - np.asarray(mr, float).reshape(len(c), -1)).sum(1) for _, _, mr in refits])
        which = np.arange(n_boot) % len(refits)
        nb = np.take_along_axis(nums[which], idx, 1).mean(1)
        db = np.take_along_axis(dens[which], idx, 1).mean(1)
    else:
        nb, db = num[idx].mean(1), den[idx].mean(1)
    boots = nb / np.where(db > 0, db, np.nan)
    lo, hi = np.quantile(db, [0.025, 0.975])
    d = float(den.mean())
    return {"point": float(num.mean() / d) if d > 0 else float("nan"), "boots": boots, "drop": d,
            "drop_ci": (float(lo), float(hi)), "testable": bool(lo > 0)}


def _drop_text(r: dict[str, Any]) -> str:
    return (f"mean-ablation drop {100 * r['drop']:.2f} points [{100 * r['drop_ci'][0]:.2f}, "
            f"{100 * r['drop_ci'][1]:.2f}]")


def _refit_triples(refits: Sequence[Sequence[dict[str, np.ndarray]]] | None, a: str | None, b: str
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Per refit ``r``: ``(a, b, mean)`` correctness stacked over the pooled layers ``[N, m]`` from
    ``refits`` (per layer, its ``R`` refits' per-problem dicts). ``a=None`` leaves ``a`` empty for
    the clean readout, which no refit changes (:func:`_with_clean`). None unless every layer has refits."""
    if not refits or any(not r for r in refits):
        return None
    R = min(len(r) for r in refits)
    out = []
    for i in range(R):
        per = [r[i] for r in refits]
        out.append((None if a is None else _stack(per, f"{a}_correct"), _stack(per, f"{b}_correct"),
                    _stack(per, "mean_correct")))
    return out


def _with_clean(triples: list | None, clean: np.ndarray) -> list | None:
    """Put the (unrefitted) clean readout in place of the empty ``a`` of each triple."""
    return None if triples is None else [(clean, b, m) for _, b, m in triples]


def _refit_text(refits: Sequence | None) -> str:
    n = min(len(r) for r in refits) if refits and all(refits) else 0
    return (f"; the interval refits the training fit (mean, threshold, PC1, controls) on {n} bootstrap "
            f"resamples of the training problems (replicate b reads refit b mod {n})" if n
            else "; training fit held fixed in the interval")


def _unit(refits: Sequence | None) -> str:
    return PROBLEMS_REFIT if refits and all(refits) else PROBLEMS


def clip_sparsity_rows(per: Sequence[dict[str, np.ndarray]], label: str, n_boot: int = 2000, seed: int = 0,
                       primary: bool = False, target_sig: float = 0.5, target_insig: float = 0.25,
                       split: str = "validation", refits: Sequence[Sequence[dict[str, np.ndarray]]] | None = None
                       ) -> list[dict[str, Any]]:
    """CLIP's sparsity test for the layers of ``per`` (per-problem outcomes of
    :func:`protocol.layer_protocol`, all neurons; several layers are pooled: their drops summed):

    - ``drop(ablate significant) / drop(mean)``: CLIP finds most of the drop (target ``> 0.5``);
    - ``drop(ablate insignificant) / drop(mean)``: CLIP finds little of it (target ``< 0.25``).

    Control: what a dense effect would give, the share of (problem, neuron) effects each edit
    ablates (``s`` significant, ``1 - s`` insignificant): the interval must exclude it. Not
    testable when the mean-ablation drop's interval includes 0. ``refits``: per layer of ``per``,
    the per-problem readouts of refits of the training fit (:func:`drop_ratio`)."""
    c, m = _stack(per, "clean_correct"), _stack(per, "mean_correct")
    s = float(np.mean([np.mean(p["significant_share"]) for p in per]))
    rows = []
    for edit, target, higher, control, claim in (
            ("ablate_significant", target_sig, True, s, "most"),
            ("ablate_insignificant", target_insig, False, 1 - s, "little")):
        measure = f"{label}: drop({edit.replace('_', ' ')}) / drop(mean)"
        r = drop_ratio(c, _stack(per, f"{edit}_correct"), c, m, n_boot, seed,
                       _with_clean(_refit_triples(refits, None, edit), c))
        how = (f"CLIP's sparsity test (CLIP: {claim} of the drop): validation accuracy drop when only the "
               f"{edit.split('_')[1]} effects of all neurons are replaced by their training means, over the "
               f"drop of the full mean-ablation (both paired over problems, ratio recomputed per replicate); "
               f"control: the share of (problem, neuron) effects ablated ({control:.3f}), what a dense effect "
               f"would cost; {_drop_text(r)}{_refit_text(refits)}")
        if not r["testable"]:
            rows.append(not_measurable(measure, how, f"{_drop_text(r)}: the interval includes 0", target, higher,
                                       resampled=_unit(refits), split=split, primary=primary))
            continue
        rows.append(interval_row(measure, r["point"], r["boots"], control, target, how, higher,
                                 resampled=_unit(refits), split=split, primary=primary))
    return rows


def rank1_rows(per: Sequence[dict[str, np.ndarray]], label: str, n_boot: int = 2000, seed: int = 0,
               primary: Sequence[str] = (), margin: float = float("nan"),  # "random", "mean_direction"
               split: str = "validation", refits: Sequence[Sequence[dict[str, np.ndarray]]] | None = None
               ) -> list[dict[str, Any]]:
    """Rank-1 onto PC1 beyond its controls: ``(acc(rank-1 PC1) - acc(rank-1 control)) /
    drop(mean)``, paired over problems (the recovered shares share their denominator), for the
    controls ``random`` (a random unit direction in each neuron's span) and ``mean direction``
    (the neuron's mean-effect direction). Control 0; target ``margin`` (0 when NaN: established
    above it, refuted wholly below it); ``primary`` names the controls whose row is primary.
    ``refits``: as for :func:`clip_sparsity_rows`."""
    c, m, r1 = _stack(per, "clean_correct"), _stack(per, "mean_correct"), _stack(per, "rank1_correct")
    base = drop_ratio(r1, m, c, m, n_boot, seed, _refit_triples(refits, "rank1", "mean"))
    rows = []
    for key, name in (("rank1_random", "random direction in span"), ("rank1_mean_direction", "mean-effect direction")):
        if f"{key}_correct" not in per[0]:
            continue
        ctrl = _stack(per, f"{key}_correct")
        r = drop_ratio(r1, ctrl, c, m, n_boot, seed, _refit_triples(refits, "rank1", key))
        rc = drop_ratio(ctrl, m, c, m, n_boot, seed, _refit_triples(refits, key, "mean"))
        measure = f"{label}: rank-1 recovered share, PC1 minus {name}"
        how = (f"(acc(rank-1 onto PC1) - acc(rank-1 onto the {name})) / (acc(clean) - acc(mean)) on validation, "
               f"all neurons, paired bootstrap over problems; PC1 recovers {base['point']:.3f}, the {name} "
               f"{rc['point']:.3f}; {_drop_text(r)}{_refit_text(refits)}")
        kw = dict(resampled=_unit(refits), split=split, primary=key[len("rank1_"):] in primary, margin=margin)
        t = 0.0 if margin != margin else float(margin)
        if not r["testable"]:
            rows.append(not_measurable(measure, how, f"{_drop_text(r)}: the interval includes 0", t, **kw))
            continue
        rows.append(interval_row(measure, r["point"], r["boots"], 0.0, t, how + (
            f"; target: beyond the control by more than {t:g} of the drop" if t else ""), **kw))
    return rows


# ----------------------------------------------------------------------------- PC1 structure


def _proj2(dc: torch.Tensor, G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[N, s]`` squared projections of effects ``M_n^T dc`` on unit directions ``M_n^T v_n``."""
    return torch.einsum("bkn,nkj,jn->bn", dc, G, v).square()


def _quad(dc: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bkn,nkj,bjn->bn", dc, G, dc).clamp_min(0)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of ``range(n)`` without fixed points (``n >= 2``; identity for 1)."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def activation_only(dc: torch.Tensor, G: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The activation-only null of centred coefficients ``dc [N, K, s]``: each problem keeps its
    effect's magnitude (its activation times the norm of its attention / scale profile) and takes
    the profile's direction over the ``K`` heads from a random other problem:
    ``dc_null[i] = ||dc_i|| dc_pi(i) / ||dc_pi(i)||`` (norms in each neuron's metric ``G_n``), so
    every problem's energy is unchanged and only the co-variation of head coefficients with the
    problem is broken."""
    N = dc.shape[0]
    pi = torch.as_tensor(np.random.default_rng(seed).permutation(N))
    nrm = _quad(dc, G).sqrt()  # [N, s]
    unit = dc / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    return unit[pi] * nrm[:, None]


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    """Columns ``[K, s]`` scaled to unit norm (zero columns stay zero)."""
    n = x.norm(dim=0, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(1e-30), torch.zeros_like(x))


def structure_refits(st: dict[str, torch.Tensor], share: float = 0.02, seed: int = 0, n_refit: int = 20,
                     n_boot: int = 1000) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the PC1-structure shares **with the training fits refitted**.

    Replicate ``b`` (of ``n_boot``) resamples the validation problems (counts seeded by ``seed``,
    the same for every layer of a run) and uses training refit ``b mod n_refit``: a bootstrap
    resample of the training problems (also seeded by ``seed`` alone) from which the training
    mean, the top-k problems, the PC1, the mean-effect direction, another neuron's PC1 and the
    activation-only null's PC1 are all refitted, exactly as :func:`structure_arrays` fits them
    once. So the interval carries both sources of sampling variability: which validation
    problems measure and which training problems fit (the training component through
    ``n_refit`` distinct refits). Everything is computed in orthonormal coordinates of each
    neuron's span (``y = B dc`` with ``B^T B = G``), where effect energies are squared norms.

    Returns ``{key: [n_boot, s]}`` per-neuron validation shares ``sum_b w num / sum_b w energy``
    for ``key`` in ``pc1``, ``mean_direction``, ``other``, ``null_pc1``, and ``n_refit``."""
    ct, cv = st["coef_train"].float(), st["coef_val"].float()
    G, M = st["G"].float(), st["M"].float()
    N, K, s = ct.shape
    Nv = cv.shape[0]
    evals, Q = torch.linalg.eigh(G.double())
    root = evals.clamp_min(0).sqrt()
    B = (root[:, :, None] * Q.transpose(1, 2)).float()  # [s, K, K]
    inv = torch.where(root > 1e-6 * root.max(1, keepdim=True).values.clamp_min(1e-30), 1 / root.clamp_min(1e-30),
                      torch.zeros_like(root))
    Binv = (Q * inv[:, None, :]).float()  # [s, K, K]: dc = Binv y on the span
    y_tr = torch.einsum("nkj,bjn->nbk", B, ct).contiguous()  # [s, N, K]: neuron-major for the gathers
    y_va = torch.einsum("nkj,bjn->bkn", B, cv)  # [Nv, K, s]
    sq_tr = y_tr.square().sum(2)  # [s, N]
    k = min(N, max(2, int(round(share * N))))
    part = torch.as_tensor(derangement(s, seed))
    pi = torch.as_tensor(np.random.default_rng(seed).permutation(N))  # as activation_only(seed) permutes
    pi_v = torch.as_tensor(np.random.default_rng(seed + 1).permutation(Nv))
    ar = torch.arange(s)[:, None]
    tr_idx = _boot_idx(N, n_refit, seed + 7)
    w = np.stack([np.bincount(i, minlength=Nv) for i in _boot_idx(Nv, n_boot, seed)]).astype(np.float64)
    out = {key: np.zeros((n_boot, s)) for key in ("pc1", "mean_direction", "other", "null_pc1")}

    def pc1(X: torch.Tensor) -> torch.Tensor:  # [s, k, K] -> unit top right singular vector [K, s]
        C = X.transpose(1, 2) @ X if K <= X.shape[1] else None
        if C is not None:
            vec = torch.linalg.eigh(C)[1][:, :, -1]
        else:
            a = torch.linalg.eigh(X @ X.transpose(1, 2))[1][:, :, -1]
            vec = torch.einsum("nkK,nk->nK", X, a)
        return _unit_cols(vec.T)

    def refit(r: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        idx = torch.as_tensor(tr_idx[r])
        cnt = torch.bincount(idx, minlength=N).float()
        m = (y_tr.transpose(1, 2) @ cnt).T / N  # [K, s]: the resample's mean
        e_orig = sq_tr - 2 * (y_tr @ m.T[:, :, None])[:, :, 0] + m.square().sum(0)[:, None]  # [s, N]
        e_t = e_orig[:, idx].clamp_min(0)  # [s, N] over the resample's positions
        pos = e_t.topk(k, dim=1).indices  # [s, k]: positions in the resample
        top = y_tr[ar, idx[pos]] - m.T[:, None]  # [s, k, K]
        v = pc1(top)
        src = y_tr[ar, idx[pi[pos]]] - m.T[:, None]  # activation-only null: magnitude kept, profile from pi
        nsrc = src.norm(dim=2, keepdim=True)
        v_null = pc1(torch.where(nsrc > 0, src / nsrc.clamp_min(1e-30), torch.zeros_like(src))
                     * e_t.gather(1, pos).sqrt()[:, :, None])
        dv = y_va - m
        e_v = dv.square().sum(1)  # [Nv, s]
        u = torch.einsum("nkd,kn->nd", M, torch.einsum("nkj,jn->kn", Binv, v))  # [s, dm]: effect-space PC1
        g = torch.einsum("nkd,nd->nk", M, u[part])  # [s, K]: another neuron's PC1 read by neuron n
        other = torch.einsum("bkn,nk->bn", torch.einsum("nkj,bjn->bkn", Binv, dv), g).square()
        nrm = e_v.sqrt()
        unit = dv / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
        nv = unit[pi_v] * nrm[:, None]
        num = {"pc1": torch.einsum("bkn,kn->bn", dv, v).square(),
               "mean_direction": torch.einsum("bkn,kn->bn", dv, _unit_cols(m)).square(),
               "other": other, "null_pc1": torch.einsum("bkn,kn->bn", nv, v_null).square()}
        rows = np.arange(r, n_boot, n_refit)
        den = np.maximum(w[rows] @ e_v.double().numpy(), 1e-30)
        return rows, {key: (w[rows] @ x.double().numpy()) / den for key, x in num.items()}

    for rows, shares in map_replicates(refit, n_refit):  # in order: independent of the thread count
        for key, x in shares.items():
            out[key][rows] = x
    return {**out, "n_refit": n_refit}


def structure_arrays(st: dict[str, torch.Tensor], share: float = 0.02, seed: int = 0, n_refit: int = 20,
                     n_boot: int = 1000) -> dict[str, Any]:
    """Per-problem arrays of the PC1-structure rows for the neurons of one layer.

    ``st``: ``stats[layer]["structure"]`` of :func:`protocol.run_protocol` (training and validation
    coefficients, ``G``, training mean ``mean`` and top-k PC1 ``v``, the neurons' vectors ``M``).
    Returns ``energy [N_val, s]`` (centred effect energy about the training mean) and the squared
    projections ``[N_val, s]`` on the training ``pc1``, the ``mean_direction``, ``other`` (a random
    other neuron's PC1, a derangement of the neurons), and ``null_pc1`` (the activation-only null's
    validation effects on that null's own training top-k PC1); ``y [N_val, K, s]``: validation
    effects in orthonormal coordinates of each span (for the validation set's own PC1); ``k``
    (top problems the PC1 was fitted on), ``K`` and ``keep [s]`` (neurons with any training and
    validation variance: zero-variance neurons are excluded, not scored 1); ``boot``: the
    :func:`structure_refits` replicates (training fits refitted; absent when ``n_refit`` is 0)."""
    from so2lib.phases.protocol import control_directions, fit_pc1
    ct, cv = st["coef_train"].float(), st["coef_val"].float()
    G, mean, v, M = st["G"].float(), st["mean"].float(), st["v"].float(), st["M"].float()
    N, K, s = ct.shape
    dct, dcv = ct - mean, cv - mean
    e_t, e_v = _quad(dct, G), _quad(dcv, G)
    k = min(N, max(2, int(round(share * N))))
    # training top-k by centred energy (as fit_from_coefficients ranks them)
    order = e_t.argsort(0, descending=True)[:k]
    top_energy = e_t.gather(0, order).sum(0)
    keep = (top_energy > 1e-12 * top_energy.max().clamp_min(1e-30)) & (e_v.sum(0) > 0)
    mdir = control_directions(G, mean, seed)["mean_direction"]
    # another neuron's PC1 as an effect-space direction u_p = M_p^T v_p, projected per neuron: M_n u_p
    part = torch.as_tensor(derangement(s, seed))
    u = torch.einsum("nkd,kn->nd", M, v)  # [s, dm], unit
    g = torch.einsum("nkd,nd->nk", M, u[part])  # [s, K]
    other = torch.einsum("bkn,nk->bn", dcv, g).square()
    # activation-only null: fitted on its training top-k (the same problems), measured on its validation data
    nt, nv = activation_only(dct, G, seed), activation_only(dcv, G, seed + 1)
    top_null = torch.stack([nt[order[:, j], :, j] for j in range(s)], -1)
    v_null, _ = fit_pc1(top_null, G)
    evals, Q = torch.linalg.eigh(G.double())
    B = (evals.clamp_min(0).sqrt()[:, :, None] * Q.transpose(1, 2)).float()  # [s, K, K]: y = B dc
    y = torch.einsum("nkj,bjn->bkn", B, dcv)
    out = {"energy": e_v.numpy(), "pc1": _proj2(dcv, G, v).numpy(), "mean_direction": _proj2(dcv, G, mdir).numpy(),
           "other": other.numpy(), "null_pc1": _proj2(nv, G, v_null).numpy(), "y": y.numpy(), "k": k, "K": K,
           "keep": keep.numpy()}
    if n_refit > 0 and k >= max(50, 2 * K):  # only where the rows are testable
        out["boot"] = structure_refits(st, share, seed, n_refit, n_boot)
    return out


def _shares(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Per replicate (rows of problem counts ``w [B, N]``) the mean over neurons of ``sum w num / sum w den``."""
    return ((w @ num) / np.maximum(w @ den, 1e-30)).mean(1)


def structure_rows(arrays: Sequence[dict[str, Any]], label: str, n_boot: int = 1000, n_boot_ceiling: int = 200,
                   seed: int = 0, primary: bool = False, margin: float = 0.02) -> list[dict[str, Any]]:
    """The PC1-structure rows for the layers of ``arrays`` (:func:`structure_arrays`, pooled over
    layers: neurons of every layer whose ``k >= max(50, 2K)``; the same validation problems):
    the validation share along the training PC1 (mean over neurons) minus each control, paired
    over validation problems (the training fits held fixed), and the ratio to the validation
    set's own PC1. ``margin``: the difference rows' target and equivalence margin (established
    above ``margin``; refuted wholly below it, or within ``+- margin`` of 0). Not testable when no layer fits on enough top problems."""
    ok = [a for a in arrays if a["k"] >= max(50, 2 * a["K"])]
    need = ", ".join(f"k={a['k']} vs max(50, 2K)={max(50, 2 * a['K'])}" for a in arrays)
    names = (("mean_direction", "mean-effect direction", "is PC1 more than activation times a fixed vector?"),
             ("other", "another neuron's PC1", "specificity: a random other neuron of the layer"),
             ("null_pc1", "activation-only null's PC1", "each problem keeps its effect's magnitude, the head "
              "profile's direction comes from a random other problem; PC1 refitted on that null's training top-k"))
    base_how = ("validation share of each neuron's centred effect energy (about the training mean) along its "
                "training top-k PC1, mean over the neurons of the critical layers (zero-variance neurons excluded)")
    rows = []
    if not ok:
        for key, name, why in names:
            rows.append(not_measurable(f"{label}: PC1 share minus {name}", f"{base_how}; control: {why}",
                                       f"PC1 fitted on too few top problems ({need})", margin,
                                       resampled=PROBLEMS, primary=primary and key == "mean_direction"))
        rows.append(not_measurable(f"{label}: training PC1 share / validation's own PC1 share",
                                   base_how, f"PC1 fitted on too few top problems ({need})", 0.8,
                                   resampled=PROBLEMS))
        return rows
    cat = lambda key: np.concatenate([a[key][:, a["keep"]] for a in ok], 1)  # noqa: E731
    E, P1 = cat("energy"), cat("pc1")
    N = E.shape[0]
    w = np.stack([np.bincount(i, minlength=N) for i in _boot_idx(N, n_boot, seed)]).astype(float)
    one = np.ones((1, N))
    pc1_pt, pc1_fixed = float(_shares(one, P1, E)[0]), _shares(w, P1, E)
    pc1_b = pc1_fixed
    refit = all("boot" in a for a in ok) and len({a["boot"]["pc1"].shape[0] for a in ok}) == 1
    if refit:  # replicates with the training fits refitted (structure_refits): the same resamples in every layer
        bcat = lambda key: np.concatenate([a["boot"][key][:, a["keep"]] for a in ok], 1).mean(1)  # noqa: E731
        pc1_b = bcat("pc1")
        resample = (f"bootstrap over validation problems with the training fits refitted on {ok[0]['boot']['n_refit']} "
                    f"bootstrap resamples of the training problems (mean, top-k, PC1 and every control refitted)")
        res_unit = PROBLEMS_REFIT
    else:
        resample = "paired bootstrap over validation problems, training fits held fixed"
        res_unit = PROBLEMS
    n_neurons = E.shape[1]
    used = "; ".join(f"k={a['k']}, K={a['K']}, {int(a['keep'].sum())} neurons" for a in ok)
    for key, name, why in names:
        C = cat(key)
        c_pt = float(_shares(one, C, E)[0])
        how = (f"{base_how}, minus the same along the {name} ({why}); PC1 {pc1_pt:.3f}, control {c_pt:.3f}; "
               f"{n_neurons} neurons ({used}); {resample}")
        c_b = bcat(key) if refit else _shares(w, C, E)
        rows.append(interval_row(f"{label}: PC1 share minus {name}", pc1_pt - c_pt, pc1_b - c_b, 0.0,
                                 margin, how + f"; target: beyond the control by more than {margin:g}",
                                 resampled=res_unit, primary=primary and key == "mean_direction", margin=margin))
    # ceiling: the validation set's own PC1 (fitted once on all validation problems, in-sample, so an
    # optimistic ceiling), a description with both directions held fixed (the training fits too, even
    # when the difference rows refit them); the ratio of the two shares per replicate
    own = []
    for a in ok:
        y = a["y"][:, :, a["keep"]]  # [N, K, s]
        S = np.einsum("ikn,ijn->nkj", y, y, optimize=True)
        e1 = np.linalg.eigh(S)[1][:, :, -1]  # [s, K]
        own.append(np.einsum("ikn,nk->in", y, e1) ** 2)
    Pown = np.concatenate(own, 1)
    r_pt = pc1_pt / float(_shares(one, Pown, E)[0])
    r_b = pc1_fixed / _shares(w, Pown, E)
    rows.append(interval_row(
        f"{label}: training PC1 share / validation's own PC1 share", r_pt, r_b, float("nan"), 0.8,
        f"{base_how}, over the share along the PC1 of the validation effects themselves (fitted on all "
        f"validation problems: the best any single direction does on them, an optimistic ceiling); "
        f"{n_neurons} neurons; bootstrap over validation problems, both directions held fixed", resampled=PROBLEMS))
    return rows


# ----------------------------------------------------------------------------- energy share (description)


def energy_share_row(vec_train: dict[int, np.ndarray], vec_val: dict[int, np.ndarray], frac: float = 0.02,
                     n_boot: int = 1000, seed: int = 0, label: str = "sparsity (description)") -> dict[str, Any]:
    """The top-``frac`` energy share of the selected neurons' validation effects (median over
    neurons of :func:`stats.top_share` of centred energies about the training mean) minus the same
    for a dense heavy-tailed null: for each neuron, Laplace effects along one direction on every
    problem (energy ``x^2``, ``x ~ Laplace``). Bootstrap over validation problems: each replicate
    resamples the problems of both (the duplication bias of a top-k share then hits both alike)."""
    es = []
    for l in vec_train:
        mean = float32_mean(vec_train[l])  # [n, d]: the float32 copy's mean, bit for bit, without the copy
        es.append(np.square(np.asarray(vec_val[l], np.float32) - mean).sum(-1))  # [N, n]
    how = (f"median over selected neurons of the share of validation centred-effect energy in the top "
           f"{100 * frac:g}% of problems, minus the same for a dense Laplace effect on every problem (one direction; "
           f"the heavy-tailed alternative); a description: CLIP's own sparsity test is the ablation rows")
    if not es or sum(e.shape[1] for e in es) == 0:
        return not_measurable(f"{label}: top-{100 * frac:g}% energy share minus Laplace null", how,
                              "no selected neurons", 0.0, resampled=PROBLEMS)
    E = np.concatenate(es, 1)
    rng = np.random.default_rng(seed)
    Lp = np.square(rng.laplace(size=E.shape))

    def stat(idx: np.ndarray) -> float:
        return float(np.nanmedian(top_share(E[idx], frac)) - np.nanmedian(top_share(Lp[idx], frac)))
    point = stat(np.arange(len(E)))
    boots = np.array([stat(i) for i in _boot_idx(len(E), n_boot, seed)])
    null = float(np.nanmedian(top_share(Lp, frac)))
    return describe(interval_row(f"{label}: top-{100 * frac:g}% energy share minus Laplace null", point, boots,
                                 0.0, 0.0, how + f"; share {point + null:.3f}, Laplace null {null:.3f}",
                                 resampled=PROBLEMS))


# ----------------------------------------------------------------------------- layer concentration


def choose_layers(train_drop: np.ndarray, k: int, n_candidates: int) -> list[int]:
    """The ``k`` layers (among the first ``n_candidates``, those with later heads) whose
    second-order ablation drops training accuracy most."""
    order = np.argsort(-np.asarray(train_drop[:n_candidates], float), kind="stable")
    return sorted(int(l) for l in order[:k])


def concentration_row(train: dict[str, np.ndarray], val: dict[str, np.ndarray], n_layers: int, n_heads: int,
                      k: int, n_boot: int = 2000, seed: int = 0, target: float = 0.8) -> tuple[dict[str, Any], list[int]]:
    """Share of the validation second-order ablation drop (summed over layers, negative layer
    drops counted as 0 per replicate) in the ``k`` layers chosen by second-order ablation on
    training. ``train`` / ``val``: per-problem ``clean [N]`` and ``ablated [N, L]`` correctness
    (each layer's summed second-order effect replaced by its training mean). Control: the chosen
    layers' share of the later heads (a layer with more later heads has more paths). Not testable
    when ``k`` is more than half of the layers that can have a second-order effect (``L - 1``)."""
    cand = n_layers - 1
    td = (train["clean"][:, None].astype(float) - train["ablated"][:, :cand]).mean(0)
    chosen = choose_layers(td, k, cand)
    Ks = np.array([(n_layers - 1 - l) * n_heads for l in range(cand)], float)
    control = float(Ks[chosen].sum() / Ks.sum()) if Ks.sum() else float("nan")
    measure = "layer concentration: share of the second-order ablation drop in the layers chosen on training"
    how = (f"layers {chosen} chosen by second-order ablation drop on training; validation accuracy drop of each "
           f"layer's second-order mean-ablation (negative drops as 0), their share of the total over the {cand} "
           f"layers with later heads; control: their share of later heads; bootstrap over validation problems")
    if k > cand / 2:
        return not_measurable(measure, how, f"{k} chosen layers are more than half of the {cand} layers that can "
                              "have a second-order effect", target, resampled=PROBLEMS), chosen
    d = val["clean"][:, None].astype(float) - val["ablated"][:, :cand].astype(float)  # [N, cand]

    def share(idx: np.ndarray) -> float:
        m = d[idx].mean(0).clip(min=0)
        return float(m[chosen].sum() / m.sum()) if m.sum() > 0 else float("nan")
    point = share(np.arange(len(d)))
    boots = np.array([share(i) for i in _boot_idx(len(d), n_boot, seed)])
    return interval_row(measure, point, boots, control, target, how, resampled=PROBLEMS,
                        reason="no second-order ablation drop"), chosen
