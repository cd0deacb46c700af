"""CLIP's ablation protocol (Gandelsman et al., ``compute_ablations.py``) for ALL neurons of a
layer, memory-bounded through each neuron's K x K coefficient covariance.

Neuron ``n`` of layer ``l``: ``phi_n = sum_k c_k M_nk`` with ``c [K]`` its per-problem
coefficients (:func:`coefficients`) and ``M_nk = (w_n W_V[k]) W_O[k]`` in
``R^d_model``. So ``||phi_n||^2 = c^T G_n c`` with ``G_n = M_n M_n^T [K, K]``, and principal
components live in the K-dim coefficient space under the metric ``G_n``. A residual edit
``sum_n sum_k x[k, n] M_nk`` is computed as ``sum_k ((x[:, k, :] @ W_out) @ W_V[k]) @ W_O[k]``,
never forming ``M`` for all neurons at once.

Everything fitted (coefficient means, significance thresholds, PC1) comes from the training
split; :func:`layer_protocol` measures on the validation split.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from so2lib.data.labels import Encoded
from so2lib.engine.capture import AnswerRows, capture_batch
from so2lib.engine.readout import answer_metrics, final_logits
from so2lib.engine.second_order import SecondOrderEngine, engine_for
from so2lib.stats import mcnemar_exact, paired_bootstrap


def coefficients(engine: SecondOrderEngine, rows: AnswerRows, layer: int) -> torch.Tensor:
    """``c [b, K, n]`` (CPU, float32): the coefficient of every neuron of ``layer`` on every head
    ``k = (l' - layer - 1) * H + h`` of every later layer ``l'``: attention from T, divided by the
    input-norm scale (and any post-attention / post-MLP norm scale), as the engine computes them."""
    p = engine._acts(rows, layer, None)
    return torch.cat([engine._coef(rows, p, lp).float().cpu() for lp in range(layer + 1, engine.info.n_layers)], 1)


class LayerWeights:
    """Weight-only factors of one source layer, read through the engine (post-norm gains folded,
    key/value heads repeated per query head): ``W_out [n, dm]``, ``W_V [K, dm, dh]``, ``W_O [K, dh, dm]``."""

    def __init__(self, model: Any, layer: int, engine: SecondOrderEngine | None = None):
        eng = engine or engine_for(model)
        self.engine, self.layer = eng, layer
        self.W_out = eng.weights(layer).W_out.float().cpu()
        WV, WO = [], []
        for lp in range(layer + 1, eng.info.n_layers):
            w = eng.weights(lp)
            G = w.W_O.shape[0] // w.W_V.shape[0]
            WV.append((w.W_V.repeat_interleave(G, 0) if G > 1 else w.W_V).float().cpu())
            WO.append(w.W_O.float().cpu())
        self.W_V = torch.cat(WV)
        self.W_O = torch.cat(WO)
        self.K = self.W_V.shape[0]

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, dm]`` = ``sum_n sum_k x[b, k, n] M_nk`` for coefficients ``x [b, K, n]``, through the
        per-head products ``w_n W_V[k]`` (``[K, n, dh]``, built once): ``d_model / d_head`` times
        less arithmetic than going through ``d_model``."""
        P = self.products
        z = torch.bmm(x.permute(1, 0, 2).to(P.device), P)  # [K, b, dh]
        K, b, dh = z.shape
        return z.permute(1, 0, 2).reshape(b, K * dh) @ self.W_O.to(z.device).reshape(K * dh, -1)

    @property
    def products(self) -> torch.Tensor:
        """``[K, n, dh]`` the per-head products ``w_n W_V[k]``, built on first use."""
        if not hasattr(self, "_P"):
            self._P = torch.einsum("nm,kmh->knh", self.W_out, self.W_V).contiguous()
        return self._P

    def directions(self, v: torch.Tensor) -> torch.Tensor:
        """``[n, dm]`` effect-space directions ``u_n = M_n^T v_n`` of coefficient vectors ``v [K, n]``
        (through the explicit ``M`` when :meth:`keep_basis` built it: ``d_head`` times less arithmetic)."""
        if hasattr(self, "_M"):
            return torch.bmm(v.T.to(self._M)[:, None, :], self._M)[:, 0]
        P = self.products
        return torch.einsum("knh,khd->nd", v.to(P)[:, :, None] * P, self.W_O.to(P))

    def keep_basis(self, chunk: int = 256) -> torch.Tensor:
        """Build and keep ``M [n, K, dm]`` (each neuron's effect basis, ``n K d_model`` floats), for
        layers that need many :meth:`directions` (the protocol's refits)."""
        if not hasattr(self, "_M"):
            self._M = torch.cat([self.basis(slice(s, s + chunk)) for s in range(0, self.W_out.shape[0], chunk)])
        return self._M

    def basis(self, neurons: slice | torch.Tensor) -> torch.Tensor:
        """``M [s, K, dm]`` of the given neurons (from the kept basis when there is one)."""
        if hasattr(self, "_M"):
            return self._M[neurons]
        return torch.einsum("nm,kmh,khd->nkd", self.W_out[neurons], self.W_V, self.W_O)

    def coefficients_of(self, U: torch.Tensor) -> torch.Tensor:
        """``[K, n]`` ``g_n = M_n u_n`` for directions ``U [n, dm]``: an effect with coefficients ``c_n``
        projects on ``u_n`` as ``c_n . g_n``."""
        P = self.products
        return (P * torch.einsum("khd,nd->knh", self.W_O.to(P), U.to(P))).sum(-1)

    def gram(self, chunk: int = 256) -> torch.Tensor:
        """``G [n, K, K]``, ``G_n = M_n M_n^T``, built ``chunk`` neurons at a time."""
        out = []
        for s in range(0, self.W_out.shape[0], chunk):
            Mn = self.basis(slice(s, s + chunk))
            out.append(Mn @ Mn.transpose(1, 2))
        return torch.cat(out)


def quad(c: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``[b, n]`` squared effect norms ``c_n^T G_n c_n`` for coefficients ``c [b, K, n]``."""
    cp = c.permute(2, 0, 1).contiguous()  # [n, b, K]: contiguous makes the batched product 10x faster
    return (torch.bmm(cp, G) * cp).sum(-1).T.clamp_min(0)


def fit_pc1(top: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PC1 of each neuron's top-k centred effects, in coefficient space.

    ``top [k, K, n]``: centred coefficients of each neuron's top-k training problems. Returns
    ``v [K, n]`` with ``v_n^T G_n v_n = 1`` (a unit effect-space direction ``u_n = M_n^T v_n``),
    its sign chosen so that most of the top-k effects project positively (CLIP's majority rule),
    and the variance share of PC1 among the top-k ``[n]`` (uncentred second moment about the
    training mean, as the projection is taken about it)."""
    X = top.permute(2, 0, 1)  # [n, k, K]
    gram = X @ G @ X.transpose(1, 2)  # [n, k, k] effect-space Gram of the top-k
    evals, evecs = torch.linalg.eigh(gram)
    lam, a = evals[:, -1].clamp_min(1e-30), evecs[:, :, -1]  # [n], [n, k]
    v = torch.einsum("nkK,nk->nK", X, a) / lam.sqrt()[:, None]  # unit in the G metric
    proj = torch.einsum("nkK,nKJ,nJ->nk", X, G, v)
    sign = torch.where((proj > 0).sum(1) >= (proj < 0).sum(1), 1.0, -1.0)
    share = lam / evals.clamp_min(0).sum(1).clamp_min(1e-30)
    return (v * sign[:, None]).T.contiguous(), share


@torch.no_grad()
def fit_from_coefficients(c: torch.Tensor, G: torch.Tensor, share: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """Training-split statistics of every neuron of a layer from its coefficients ``c [N, K, n]``
    and Gram matrices ``G [n, K, K]``: mean coefficients ``mean [K, n]``, significance thresholds
    ``threshold [n]`` (k-th largest centred-effect norm, ``k = max(1, round(share N))``), PC1
    ``v [K, n]`` of the top-``max(2, k)`` centred effects and its share ``pc1_share [n]``, the same
    share with each head's coefficients shuffled across problems (``pc1_share_shuffled``), and
    the centred energies ``energy [N, n]`` (squared norms)."""
    mean = c.mean(0)
    dc = c - mean
    energy = quad(dc, G)  # [N, n]
    N = c.shape[0]
    k = max(1, int(round(share * N)))
    norms = energy.sqrt()
    order = norms.argsort(0, descending=True)
    threshold = norms.gather(0, order[k - 1:k])[0]
    ktop = min(N, max(2, k))
    top = torch.stack([dc[order[:ktop, j], :, j] for j in range(dc.shape[2])], -1)  # [ktop, K, n]
    v, pshare = fit_pc1(top, G)
    # null: each head's coefficients shuffled across problems independently (breaks head co-variation)
    gen = torch.Generator().manual_seed(seed)
    sh = torch.stack([dc[torch.randperm(N, generator=gen), k] for k in range(dc.shape[1])], 1)
    order_sh = quad(sh, G).argsort(0, descending=True)
    top_sh = torch.stack([sh[order_sh[:ktop, j], :, j] for j in range(sh.shape[2])], -1)
    _, pshare_sh = fit_pc1(top_sh, G)
    return {"mean": mean, "threshold": threshold, "v": v, "pc1_share": pshare, "pc1_share_shuffled": pshare_sh,
            "energy": energy, "G": G, "seed": seed}  # seed: also of the random rank-1 control (_edit_batch)


def _pc1_in_span(top: torch.Tensor, G: torch.Tensor, Lc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_pc1` from the ``K x K`` side, for ``top [n, k, K]`` with ``K < k``: with
    ``G_n = L L^T`` the top eigenvector ``w`` of ``L^T X^T X L`` gives ``v = L^-T w`` (unit in the
    ``G`` metric: ``u = M^T v`` maximises the top-k effects' squared projections), the same
    spectrum as the ``k x k`` Gram; the same majority sign rule. Returns ``v [K, n]``, share ``[n]``."""
    C = top.transpose(1, 2) @ top  # [n, K, K]
    evals, evecs = torch.linalg.eigh(Lc.transpose(1, 2) @ C @ Lc)
    w = evecs[:, :, -1:]  # [n, K, 1]
    v = torch.linalg.solve_triangular(Lc.transpose(1, 2), w, upper=True)[..., 0]  # [n, K]
    proj = (top @ (Lc @ w))[..., 0]  # [n, k]: x_i^T G v = x_i^T L w
    sign = torch.where((proj > 0).sum(1) >= (proj < 0).sum(1), 1.0, -1.0)
    share = evals[:, -1].clamp_min(1e-30) / evals.clamp_min(0).sum(1).clamp_min(1e-30)
    return (v * sign[:, None]).T.contiguous(), share


@torch.no_grad()
def refit_from_coefficients(c: torch.Tensor, G: torch.Tensor, share: float = 0.02, seed: int = 0,
                            n_refit: int = 20) -> list[dict[str, torch.Tensor]]:
    """:func:`fit_from_coefficients`' edit statistics (``mean``, ``threshold``, ``v``; no shuffled
    null, no energies) refitted on each of ``n_refit`` bootstrap resamples of the training problems
    (:func:`refit_indices`), for intervals that refit what is fitted. A second code path, two
    passes over the coefficients per refit: ``c [N, K, n]`` is centred once on its full-sample mean
    ``m0`` and laid out per neuron (``d = c - m0``, ``[n, N, K]``) with ``q_i = d_i^T G d_i``; a
    resample's mean is ``m0 + delta`` with ``delta`` the weighted sum of the rows ``d`` (weights:
    how often each row is drawn), and its centred energies are ``q_i - 2 d_i^T G delta +
    delta^T G delta`` (``delta`` is small, so no float32 cancellation even where the mean is large
    against the spread); only the top-k rows are gathered. Each refit also records ``m0`` and
    ``delta`` (for :func:`_edits`). On the unresampled sample it gives the fit's numbers (tested,
    with means up to 1,000 times the spread)."""
    m0 = c.mean(0)  # [K, n]
    dn = (c - m0).permute(2, 0, 1).contiguous()  # [n, N, K]
    n, N, K = dn.shape
    k = max(1, int(round(share * N)))
    ktop = min(N, max(2, k))
    q = (torch.bmm(dn, G) * dn).sum(-1)  # [n, N]
    Lc, info = torch.linalg.cholesky_ex(G)
    small = K < ktop and bool((info == 0).all())  # the PC1 from the K x K problem (Cholesky of G)
    out = []
    for ix in refit_indices(N, n_refit, seed):
        ixt = torch.as_tensor(ix, dtype=torch.long)
        wts = torch.bincount(ixt, minlength=N).to(dn.dtype) / N  # [N]
        delta = torch.matmul(wts, dn)  # [n, K]
        Gd = torch.bmm(G, delta[:, :, None])[..., 0]  # [n, K]
        e = q - 2 * torch.bmm(dn, Gd[:, :, None])[..., 0] + (delta * Gd).sum(-1)[:, None]  # [n, N]
        vals, order = e[:, ixt].clamp_min(0).sqrt().topk(ktop, dim=1)
        rows = ixt[order]  # [n, ktop] the top rows of the resample
        top = torch.gather(dn, 1, rows[..., None].expand(-1, -1, K)) - delta[:, None]  # [n, ktop, K]
        v, _ = _pc1_in_span(top, G, Lc) if small else fit_pc1(top.permute(1, 2, 0), G)
        out.append({"mean": m0 + delta.T, "threshold": vals[:, k - 1].contiguous(), "v": v,
                    "m0": m0, "delta": delta.T.contiguous(), "G": G, "seed": seed})
    return out


@torch.no_grad()
def fit_layer(model: Any, enc_train: Encoded, layer: int, share: float = 0.02, batch_size: int = 64,
              weights: LayerWeights | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`fit_from_coefficients` of ``layer`` over the training problems ``enc_train``
    (one forward pass per batch; memory ``N K n`` floats)."""
    w = weights or LayerWeights(model, layer)
    cs = []
    for _, x, T in enc_train.batches(batch_size):
        rows = capture_batch(model, x, T, [layer])
        cs.append(coefficients(w.engine, rows, layer))
    return fit_from_coefficients(torch.cat(cs), w.gram(), share, seed)


def g_times(G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[K, n]`` ``G_n v_n`` for ``G [n, K, K]`` and ``v [K, n]`` (a batched product; the
    equivalent einsum copies ``G``)."""
    return torch.bmm(G, v.T.to(G)[:, :, None])[..., 0].T


def mean_direction(G: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[K, n]`` the mean coefficients ``mean [K, n]`` scaled to unit effect-space norm
    (``v^T G_n v = 1``; zero where the mean effect is zero)."""
    norm = (mean * g_times(G, mean)).sum(0).clamp_min(0).sqrt()
    return torch.where(norm > 0, mean / norm.clamp_min(1e-30), torch.zeros_like(mean))


def control_directions(G: torch.Tensor, mean: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The two rank-1 controls of each neuron, as coefficient vectors ``[K, n]`` of unit effect-space
    norm (``v^T G_n v = 1``; a zero vector where a neuron has no effect at all):

    - ``mean_direction``: the direction of the neuron's training mean effect ``M_n^T mean_n`` (is the
      PC1 more than "activation times a fixed vector"?);
    - ``random``: a uniformly random unit direction in the neuron's effect span (the rows of
      ``M_n``), from ``z`` standard Gaussian in ``R^K`` (seeded by ``seed``): ``v = L^-T z / ||z||``
      with ``G_n = L L^T`` (Cholesky; ``M_n^T L^-T`` has orthonormal columns spanning the rows, so
      ``M_n^T v`` is uniform on the span's unit sphere). Where ``G_n`` is singular or
      ill-conditioned (a pivot below ``1e-6`` of its largest diagonal entry, e.g. ``K > d_model``)
      the span is read from its eigendecomposition instead: ``v = Q L^-1/2 z / ||z||`` with
      ``G_n = Q L Q^T``, eigenvalues below ``1e-6`` of the largest dropped."""
    mdir = mean_direction(G, mean)
    Gd = G.double()
    n, K = G.shape[0], G.shape[1]
    z = torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = torch.zeros(n, K, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(Gd)
    diag = torch.diagonal(Gd, dim1=1, dim2=2)
    piv = torch.diagonal(L, dim1=1, dim2=2) ** 2
    good = (info == 0) & (piv.min(1).values > 1e-6 * diag.max(1).values) & (diag.max(1).values > 0)
    if good.any():
        zg = z[good]
        r[good] = torch.linalg.solve_triangular(L[good].transpose(1, 2), zg[..., None], upper=True)[..., 0] \
            / zg.norm(dim=1, keepdim=True)
    bad = ~good
    if bad.any():  # singular or ill-conditioned spans: the eigendecomposition
        evals, Q = torch.linalg.eigh(Gd[bad])  # [b, K], [b, K, K]
        ok = evals > 1e-6 * evals[:, -1:].clamp_min(1e-300)
        zb = z[bad] * ok
        rb = torch.einsum("nkj,nj->nk", Q, zb / evals.clamp_min(1e-300).sqrt() * ok)
        rn = zb.norm(dim=1, keepdim=True)
        r[bad] = torch.where(rn > 0, rb / rn.clamp_min(1e-300), torch.zeros_like(rb))
    return {"mean_direction": mdir.float(), "random": r.T.float().contiguous()}


def _unit_directions(w: LayerWeights, fit: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per rank-1 edit of :func:`_edits` (``rank1``, ``rank1_random``, ``rank1_mean_direction``):
    ``(G_n v_n [K, n], u_n = M_n^T v_n [n, dm])`` of its coefficient direction ``v``, built once
    per fit and kept in it (``fit["units"]``; the control directions in ``fit["controls"]``)."""
    names = ("rank1", "rank1_random", "rank1_mean_direction")
    units = fit.setdefault("units", {})
    if any(k not in units for k in names):
        G = fit["G"]
        ctrl = fit.get("controls")
        if ctrl is None:
            ctrl = fit["controls"] = control_directions(G, fit["mean"], int(fit.get("seed", 0)))
        for name, d in zip(names, (fit["v"], ctrl["random"], ctrl["mean_direction"])):
            if name not in units:
                units[name] = (g_times(G, d), w.directions(d))
    return {k: units[k] for k in names}


def _prepare_refit(w: LayerWeights, fit: dict[str, Any], random: torch.Tensor,
                   random_units: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Fill a refit's ``controls``, ``units`` (:func:`_unit_directions`) and ``Gd = G delta`` in two batched
    products (``G`` and ``M`` read once each; they are the layer's largest arrays). The random
    control depends on the weights and the seed only: the fit's own, shared."""
    G, v, mean = fit["G"], fit["v"], fit["mean"]
    GX = torch.bmm(G, torch.stack([v.T, mean.T, fit["delta"].T], 2))  # [n, K, 3]
    Gv, Gm, Gd = GX[..., 0].T, GX[..., 1].T, GX[..., 2].T
    norm = (mean * Gm).sum(0).clamp_min(0).sqrt()
    scale = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-30), torch.zeros_like(norm))
    mdir = mean * scale  # as mean_direction(G, mean)
    if hasattr(w, "_M"):
        U = torch.bmm(torch.stack([v.T, mdir.T], 1), w._M)  # [n, 2, dm]
        Uv, Um = U[:, 0], U[:, 1]
    else:
        Uv, Um = w.directions(v), w.directions(mdir)
    fit["Gd"] = Gd
    fit["controls"] = {"random": random, "mean_direction": mdir}
    fit["units"] = {"rank1": (Gv, Uv), "rank1_random": random_units, "rank1_mean_direction": (Gm * scale, Um)}


def _edits(w: LayerWeights, fit: dict[str, Any], c: torch.Tensor, keep: torch.Tensor,
           cp: torch.Tensor | None = None, q0: torch.Tensor | None = None
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """CLIP's edits of one batch, residual changes at T ``[b, dm]`` by name, and the significance
    mask ``[b, n]``. With ``dc = (c - mean) * keep`` the centred effects of the kept neurons,
    ``E = sum_n M_n^T dc_n`` and ``S`` the same over the significant effects only (norm above the
    training threshold): ``mean = -E``, ``ablate_significant = -S``, ``ablate_insignificant = S - E``
    and each rank-1 edit ``a @ U - E`` (``a [b, n]`` the effects' projections on the unit
    directions ``U [n, dm]``; :func:`_unit_directions`). Two full edits per batch; the other four
    follow by linearity. ``cp``: ``c`` laid out per neuron (``[n, b, K]``, contiguous), shared by
    the several fits and scopes of one batch. ``q0`` (a refit of :func:`refit_from_coefficients`,
    all neurons kept): with ``cp`` centred on the refit's reference mean ``m0``
    (``cp = c - m0`` per neuron) and ``q0 [b, n] = d^T G d`` of it, the centred energies follow as
    ``q0 - 2 d.G delta + delta.G delta`` (equal up to float rounding, no cancellation), and every
    projection from one pass over ``cp``."""
    G, mean, thr = fit["G"], fit["mean"], fit["threshold"]
    units = _unit_directions(w, fit)
    if q0 is not None and cp is not None:
        if not bool(keep.all()):
            raise ValueError("the refit path of _edits needs every neuron kept")
        delta = fit["delta"]  # [K, n]
        GX = torch.stack([fit["Gd"]] + [g for g, _ in units.values()], 2).permute(1, 0, 2).contiguous()  # [n, K, 4]
        pr = torch.bmm(cp, GX) - (delta.T[:, None, :] @ GX)  # [n, b, 4]: (c - mean) . (G delta, G v_1, ...)
        dGd = (delta * fit["Gd"]).sum(0)  # [n]
        e = q0 - 2 * pr[..., 0].T - dGd  # = q0 - 2 d.G delta + delta.G delta, as (c - mean) = d - delta
        sig = e.clamp_min(0).sqrt() > thr
        dc = c - mean
        E = w.edit(dc)
        S = w.edit(dc * sig[:, None])
        edits = {"mean": -E, "ablate_significant": -S, "ablate_insignificant": S - E}
        for j, (name, (_, U)) in enumerate(units.items()):
            edits[name] = pr[..., j + 1].T @ U.to(dc) - E
        return edits, sig
    dc = (c - mean) * keep  # [b, K, n]
    if cp is None:
        sig = quad(dc, G).sqrt() > thr  # [b, n]
    else:  # the same arithmetic as quad(dc, G), without laying dc out again
        dcp = (cp - mean.T[:, None]) * keep[:, None, None]
        sig = (torch.bmm(dcp, G) * dcp).sum(-1).T.clamp_min(0).sqrt() > thr
    E = w.edit(dc)
    S = w.edit(dc * sig[:, None])
    edits = {"mean": -E, "ablate_significant": -S, "ablate_insignificant": S - E}
    for name, (Gv, U) in units.items():
        edits[name] = (dc * Gv).sum(1) @ U.to(dc) - E  # projections [b, n] on the unit directions
    return edits, sig


def _edit_batch(model: Any, w: LayerWeights, fit: dict[str, torch.Tensor], c: torch.Tensor,
                final_resid: torch.Tensor, gold: torch.Tensor, keep: torch.Tensor, out: dict[str, list],
                clean: bool = True, cp: torch.Tensor | None = None, q0: torch.Tensor | None = None) -> None:
    """Append one batch's clean (unless ``clean`` is False) and edited readouts (see
    :func:`layer_protocol`, :func:`_edits`) to ``out``."""
    edits, sig = _edits(w, fit, c, keep, cp, q0)
    if clean:
        edits = {"clean": torch.zeros(len(gold), w.W_out.shape[1]), **edits}
    _read(model, final_resid, edits, gold, out)
    out.setdefault("significant_share", []).append(sig[:, keep].float().mean(1).numpy())


def _read(model: Any, final_resid: torch.Tensor, edits: dict[str, torch.Tensor], gold: torch.Tensor,
          out: dict[str, list]) -> None:
    """Append each edit's per-problem correctness and logit difference (``{name}_correct``,
    ``{name}_logit_diff``) to ``out``: the residual at T plus the edit, through the final norm and
    the unembedding only (all edits of the batch in one product)."""
    names = list(edits)
    b = len(gold)
    x = (final_resid[None] + torch.stack([edits[k] for k in names])).reshape(len(names) * b, -1)
    ok, ld = answer_metrics(final_logits(model, x), gold.repeat(len(names)))
    for j, name in enumerate(names):
        out.setdefault(f"{name}_correct", []).append(ok[j * b:(j + 1) * b].numpy())
        out.setdefault(f"{name}_logit_diff", []).append(ld[j * b:(j + 1) * b].numpy())


def _keep(n: int, neurons: torch.Tensor | None) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[neurons if neurons is not None else slice(None)] = True
    return keep


@torch.no_grad()
def layer_protocol(model: Any, enc_val: Encoded, gold_val: torch.Tensor, layer: int, fit: dict[str, torch.Tensor],
                   batch_size: int = 64, neurons: torch.Tensor | None = None,
                   weights: LayerWeights | None = None) -> dict[str, np.ndarray]:
    """Per validation problem ``[N]``: correctness and logit difference of the clean model and with
    every neuron of ``layer`` (or only ``neurons``) edited as CLIP does: ``mean`` (all effects
    replaced by their training mean), ``ablate_significant``, ``ablate_insignificant`` and ``rank1``
    (mean + projection on PC1). Edits act on the residual at T before the final norm."""
    w = weights or LayerWeights(model, layer)
    keep = _keep(fit["mean"].shape[1], neurons)
    out: dict[str, list] = {}
    for rows_idx, x, T in enc_val.batches(batch_size):
        rows = capture_batch(model, x, T, [layer])
        _edit_batch(model, w, fit, coefficients(w.engine, rows, layer), rows.final_resid.cpu(),
                    gold_val[rows_idx.start:rows_idx.stop], keep, out)
    return {k: np.concatenate(v) for k, v in out.items()}


def layer_groups(layers: Sequence[int], n_problems: int, K: dict[int, int], d_mlp: int,
                 budget_bytes: int, extra: dict[int, int] | None = None) -> list[list[int]]:
    """Consecutive groups of ``layers`` whose coefficients (``n_problems K_l d_mlp`` floats), Gram
    matrices (``d_mlp K_l^2``), head products (``d_mlp K_l d_head``, counted as ``64``) and any
    ``extra`` bytes per layer (the refits' copies, :func:`run_protocol`) fit in ``budget_bytes``
    together (at least one layer each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for l in layers:
        size = 4 * d_mlp * K[l] * (n_problems + K[l] + 64) + (extra or {}).get(l, 0)
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(l)
        used += size
    return [g for g in groups if g]


def auto_budget(share: float = 0.25, low: int = 2 << 30, high: int = 8 << 30) -> int:
    """Bytes for :func:`run_protocol`'s layer groups: ``share`` of the memory available now
    (Linux ``MemAvailable``; ``low`` where it cannot be read), clipped to ``[low, high]``."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return low
    return int(min(high, max(low, share * avail)))


def refit_indices(n: int, n_refit: int, seed: int = 0) -> list[np.ndarray]:
    """The training rows of each of ``n_refit`` refits: bootstrap resamples of ``n`` problems
    (seeded; the same for every layer, so pooled layers refit on one joint resample)."""
    g = np.random.default_rng(seed + 20_011)
    return [g.integers(0, n, n) for _ in range(n_refit)]


@torch.no_grad()
def run_protocol(model: Any, enc_train: Encoded, enc_val: Encoded, gold_val: torch.Tensor, layers: Sequence[int],
                 scopes: dict[int, dict[str, torch.Tensor | None]], share: float = 0.02, batch_size: int = 64,
                 budget: int | str = "auto", max_fit_problems: int = 4000, seed: int = 0,
                 progress: bool = True, keep: dict[int, torch.Tensor] | None = None,
                 refit: dict[int, int] | None = None,
                 ) -> tuple[dict[tuple[int, str], dict[str, np.ndarray]], dict[int, dict]]:
    """The CLIP protocol for several source layers with few forward passes.

    Layers are processed in groups that fit ``budget`` (:func:`layer_groups`; ``"auto"``:
    :func:`auto_budget`, a quarter of the memory available, between 2 and 8 GiB; the grouping
    changes no number, only how many passes there are); per group, one
    forward pass per training batch fits every layer of the group (:func:`fit_from_coefficients`,
    on at most ``max_fit_problems`` training problems, the first ones of a fixed random order)
    and one pass per validation batch measures every layer and scope of ``scopes``
    (``{layer: {scope name: neurons or None for all}}``). Returns the per-problem readouts
    ``{(layer, scope): ...}`` (as :func:`layer_protocol`) and per layer the PC1 statistics
    ``{"pc1_share", "pc1_share_shuffled", "K", "n_fit"}``. ``keep``: ``{layer: neurons}`` whose
    training and validation coefficients are also returned, in ``stats[layer]["structure"]``
    (``neurons``, ``coef_train [N_fit, K, s]``, ``coef_val [N_val, K, s]``, ``G``, ``mean``, ``v``,
    ``M [s, K, d_model]``: what the PC1-structure rows need) and every neuron's fit,
    ``stats[layer]["fit"]`` (``v`` and ``mean``, ``[K, d_mlp]``; for :func:`evaluate_replacements`).
    ``refit``: ``{layer: R}`` whose training fit is also refitted ``R`` times on bootstrap resamples
    of the training problems (:func:`refit_indices`; no shuffled null), each refit's edits of all
    neurons read on every validation problem: ``stats[layer]["refits"]``, a list of ``R``
    per-problem dicts as above without ``clean`` (for intervals that refit what is fitted)."""
    from so2lib.engine.second_order import _bytes
    from so2lib.runs.progress import tqdm
    eng = engine_for(model)
    L, H, n = eng.info.n_layers, eng.info.n_heads, eng.info.d_mlp
    K = {l: (L - l - 1) * H for l in layers}
    N = len(enc_train)
    idx = list(range(N))
    if N > max_fit_problems:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(N, generator=g)[:max_fit_problems].tolist())
    train = enc_train.subset(idx) if len(idx) < N else enc_train
    # a refit layer also holds its effect basis M (n K d_model) and the per-neuron copy of its
    # coefficients with one temporary of the same size (refit_from_coefficients)
    extra = {l: 4 * n * K[l] * (eng.info.d_model + 2 * len(idx)) for l in (refit or {}) if l in K}
    groups = layer_groups(list(layers), len(idx), K, n, auto_budget() if budget == "auto" else _bytes(budget), extra)
    per: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    stats: dict[int, dict] = {}
    bar = tqdm(total=len(list(layers)), desc="CLIP protocol, source layers", disable=not progress)
    for group in groups:
        ws = {l: LayerWeights(model, l, eng) for l in group}
        cs: dict[int, list] = {l: [] for l in group}
        for _, x, T in train.batches(batch_size):
            rows = capture_batch(model, x, T, group)
            for l in group:
                cs[l].append(coefficients(eng, rows, l))
        fits = {}
        refits: dict[int, list[dict[str, torch.Tensor]]] = {}
        for l in group:
            c_l = torch.cat(cs.pop(l))
            if refit and refit.get(l):
                ws[l].keep_basis()  # many directions() to come
            fits[l] = fit_from_coefficients(c_l, ws[l].gram(), share, seed)
            if refit and refit.get(l):
                refits[l] = refit_from_coefficients(c_l, fits[l]["G"], share, seed, int(refit[l]))
                main = _unit_directions(ws[l], fits[l])
                for f_r in refits[l]:
                    _prepare_refit(ws[l], f_r, fits[l]["controls"]["random"], main["rank1_random"])
            stats[l] = {"pc1_share": fits[l]["pc1_share"].numpy(), "pc1_share_shuffled":
                        fits[l]["pc1_share_shuffled"].numpy(), "K": K[l], "n_fit": len(idx)}
            del fits[l]["energy"]
            if keep and l in keep:
                stats[l]["fit"] = {"v": fits[l]["v"].clone(), "mean": fits[l]["mean"].clone()}
                kn = torch.as_tensor(keep[l], dtype=torch.long)
                W = ws[l]
                Mn = W.basis(kn)
                stats[l]["structure"] = {"neurons": kn, "coef_train": c_l[..., kn].clone(),
                                         "coef_val": [], "G": fits[l]["G"][kn], "mean": fits[l]["mean"][:, kn],
                                         "v": fits[l]["v"][:, kn], "M": Mn}
            del c_l
        outs: dict[tuple[int, str], dict[str, list]] = {(l, sc): {} for l in group for sc in scopes.get(l, {})}
        routs: dict[int, list[dict[str, list]]] = {l: [{} for _ in fs] for l, fs in refits.items()}
        every = torch.ones(n, dtype=torch.bool)
        keeps = {(l, sc): _keep(n, ns) for l in group for sc, ns in scopes.get(l, {}).items()}
        for rows_idx, x, T in enc_val.batches(batch_size):
            rows = capture_batch(model, x, T, group)
            fr = rows.final_resid.cpu()
            gold = gold_val[rows_idx.start:rows_idx.stop]
            for l in group:
                c = coefficients(eng, rows, l)
                if "structure" in stats[l]:
                    stats[l]["structure"]["coef_val"].append(c[..., stats[l]["structure"]["neurons"]].clone())
                cp = c.permute(2, 0, 1).contiguous()  # [n, b, K], once for every fit and scope
                for sc in scopes.get(l, {}):
                    _edit_batch(model, ws[l], fits[l], c, fr, gold, keeps[(l, sc)], outs[(l, sc)], cp=cp)
                if l in refits:  # centred once on the refits' reference mean, for every refit
                    cp0 = cp - refits[l][0]["m0"].T[:, None]
                    q0 = (torch.bmm(cp0, fits[l]["G"]) * cp0).sum(-1).T  # [b, n]
                    for f_r, o in zip(refits[l], routs[l]):
                        _edit_batch(model, ws[l], f_r, c, fr, gold, every, o, clean=False, cp=cp0, q0=q0)
        for key, o in outs.items():
            per[key] = {k: np.concatenate(v) for k, v in o.items()}
        for l, os_ in routs.items():
            stats[l]["refits"] = [{k: np.concatenate(v) for k, v in o.items()} for o in os_]
        for l in group:
            if "structure" in stats[l]:
                stats[l]["structure"]["coef_val"] = torch.cat(stats[l]["structure"]["coef_val"])
        del fits, ws, refits
        bar.update(len(group))
    bar.close()
    return per, stats


@torch.no_grad()
def evaluate_replacements(model: Any, enc_val: Encoded, gold_val: torch.Tensor, fits: dict[int, dict[str, torch.Tensor]],
                          directions: dict[str, dict[int, torch.Tensor]], batch_size: int = 64) -> dict[str, np.ndarray]:
    """CLIP's ``--evaluate`` on **all** neurons of the layers of ``fits`` (``{layer: {"v", "mean"}}``
    from :func:`run_protocol`) at once. Per validation problem ``[N]``: correctness and logit
    difference of the clean model (``clean``), with every neuron's effect replaced by its training
    mean (``mean``), and for each ``directions[name][layer] [d_mlp, d_model]`` (one unit effect-space
    direction per neuron, e.g. its PC1 or that PC1's sparse reconstruction) by the mean plus the
    effect's projection on that direction (``name``). Edits act on the residual at T."""
    eng = engine_for(model)
    layers = sorted(fits)
    ws = {l: LayerWeights(model, l, eng) for l in layers}
    proj = {name: {l: (ws[l].coefficients_of(per[l].float()), per[l].float()) for l in layers}
            for name, per in directions.items()}
    out: dict[str, list] = {}
    for rows_idx, x, T in enc_val.batches(batch_size):
        rows = capture_batch(model, x, T, layers)
        fr = rows.final_resid.cpu().float()
        gold = gold_val[rows_idx.start:rows_idx.stop]
        base = torch.zeros_like(fr)
        parts = {name: torch.zeros_like(fr) for name in directions}
        for l in layers:
            dc = coefficients(eng, rows, l) - fits[l]["mean"]
            base -= ws[l].edit(dc)
            for name in directions:
                g, U = proj[name][l]
                parts[name] += torch.einsum("bkn,kn->bn", dc, g) @ U
        _read(model, fr, {"clean": torch.zeros_like(fr), "mean": base, **{k: base + v for k, v in parts.items()}},
              gold, out)
    return {k: np.concatenate(v) for k, v in out.items()}


def recovered_difference(clean: np.ndarray, mean: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                         seed: int = 0) -> dict[str, Any]:
    """``(acc(a) - acc(b)) / (acc(clean) - acc(mean))``: how much more of the mean-ablation drop
    replacement ``a`` recovers than ``b``, with paired bootstrap replicates over problems (the same
    resample in numerator and denominator). ``b`` may be ``[S, n]``, one row per draw of a random
    control (vocabulary subsets): the point uses their mean, and each replicate draws one of them,
    so the control's own spread is in the interval. Not testable when the drop's CI includes zero."""
    c, m, x, y = (np.asarray(v, float) for v in (clean, mean, a, b))
    draws = None
    if y.ndim == 2:
        draws, y = y, y.mean(0)
    drop = paired_bootstrap(m, c, n_boot, seed)
    if not drop["ci_low"] > 0:
        return {"point": float("nan"), "boots": np.zeros(0),
                "note": f"mean-ablation drop {100 * drop['change']:.2f} points, CI [{100 * drop['ci_low']:.2f}, "
                        f"{100 * drop['ci_high']:.2f}] includes 0"}
    idx = np.random.default_rng(seed).integers(0, len(c), size=(n_boot, len(c)))
    den = (c - m)[idx].mean(1)
    if draws is None:
        num = (x - y)[idx].mean(1)
    else:  # replicate j: problems idx[j] and control draw pick[j]
        pick = np.random.default_rng(seed + 1).integers(0, len(draws), n_boot)
        num = np.take_along_axis(x[None] - draws[pick], idx, 1).mean(1)
    boots = num / np.where(den > 0, den, np.nan)
    return {"point": float((x - y).mean() / (c - m).mean()), "boots": boots[np.isfinite(boots)], "note": ""}


def protocol_table(per_problem: dict[str, np.ndarray], layer: int, scope: str, n_boot: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """One row per edit: accuracy and logit-difference change from clean (paired bootstrap CIs,
    points / logits), exact McNemar p, and for ``rank1`` the share of the mean-ablation accuracy
    drop it recovers (bootstrap CI; NaN = not testable when the mean-ablation drop's CI includes 0)."""
    c0, l0 = per_problem["clean_correct"], per_problem["clean_logit_diff"]
    rows = []
    for name in [e for e in ("mean", "ablate_significant", "ablate_insignificant", "rank1", "rank1_random",
                             "rank1_mean_direction") if f"{e}_correct" in per_problem]:
        c, ld = per_problem[f"{name}_correct"], per_problem[f"{name}_logit_diff"]
        acc = paired_bootstrap(c0, c, n_boot, seed)
        lg = paired_bootstrap(l0, ld, n_boot, seed)
        mc = mcnemar_exact(c0, c)
        rows.append({"layer": layer, "neurons": scope, "edit": name, "accuracy": float(c.mean()),
                     "accuracy_change_points": 100 * acc["change"], "ci_low_points": 100 * acc["ci_low"],
                     "ci_high_points": 100 * acc["ci_high"], "logit_diff_change": lg["change"],
                     "ld_ci_low": lg["ci_low"], "ld_ci_high": lg["ci_high"], "mcnemar_p": mc["p"],
                     "gained": mc["gained"], "lost": mc["lost"], "n": acc["n"]})
    df = pd.DataFrame(rows)
    rec = recovered_share(c0, per_problem["mean_correct"], per_problem["rank1_correct"], n_boot, seed)
    df["recovered_share"] = np.where(df.edit == "rank1", rec["share"], np.nan)
    df["recovered_ci_low"] = np.where(df.edit == "rank1", rec["ci_low"], np.nan)
    df["recovered_ci_high"] = np.where(df.edit == "rank1", rec["ci_high"], np.nan)
    df["recovered_note"] = np.where(df.edit == "rank1", rec["note"], "")
    return df


def recovered_share(clean: np.ndarray, mean: np.ndarray, rank1: np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """``(acc(rank1) - acc(mean)) / (acc(clean) - acc(mean))`` with a paired bootstrap CI
    (:func:`recovered_difference` of ``rank1`` against ``mean``). Not testable (NaN, with a note)
    when the mean-ablation drop's CI includes zero: there is nothing for rank-1 to recover."""
    r = recovered_difference(clean, mean, rank1, mean, n_boot, seed)
    if r["note"]:
        return {"share": np.nan, "ci_low": np.nan, "ci_high": np.nan, "note": "not testable: " + r["note"]}
    lo, hi = np.quantile(r["boots"], [0.025, 0.975]) if len(r["boots"]) else (np.nan, np.nan)
    return {"share": r["point"], "ci_low": float(lo), "ci_high": float(hi), "note": ""}