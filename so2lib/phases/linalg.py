"""Batched linear algebra the phases' bootstraps share (pure numpy/torch, no model).

- :func:`omp`: orthogonal matching pursuit of many targets at once over one dictionary, the same
  greedy algorithm as scikit-learn's ``orthogonal_mp`` with ``n_nonzero_coefs`` (tested against
  it), but one batched least-squares solve per step instead of a Python loop per target: a
  bootstrap that decomposes 200 directions in each of 100 replicates spends seconds, not minutes.
- :class:`SpanPCA`: each neuron's effect vectors ``[N, d]`` held as coordinates in their own row
  space (rank ``r <= d``; for a second-order effect at most the number of later heads), so that
  the PC1 or the span of a bootstrap resample of the problems costs an ``r x r`` scatter formed
  from resample counts, not a copy of ``[N, d]`` and a ``d x d`` scatter per neuron. Exact: the
  resample's centred scatter is the same matrix in other coordinates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def omp(directions: np.ndarray, dictionary: np.ndarray, m: int) -> np.ndarray:
    """OMP codes ``[B, K]`` (at most ``m`` non-zeros per row) of ``directions [B, d]`` over the
    atoms ``dictionary [K, d]`` (rows), in float64.

    Each step picks, for every target, the atom of largest ``|<atom, residual>|`` (the first on
    ties, as ``numpy.argmax``), refits the coefficients of the chosen atoms by least squares and
    updates the residual. A target stops early, as scikit-learn's does, when the best atom is one
    already chosen or has an inner product with the target below machine precision, or when the
    next atom is linearly dependent on those chosen; and also when its residual is zero to 1e-10
    of the target (scikit-learn would then pick an atom by rounding noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batched ops: on shared cores, more threads only contend
    try:
        return _omp(directions, dictionary, m)
    finally:
        torch.set_num_threads(threads)


def _omp(directions: np.ndarray, dictionary: np.ndarray, m: int) -> np.ndarray:
    Y = torch.as_tensor(np.asarray(directions, np.float64))
    D = torch.as_tensor(np.asarray(dictionary, np.float64))
    B, K = Y.shape[0], D.shape[0]
    if not 1 <= m <= min(D.shape):
        raise ValueError(f"sparsity m={m} must be between 1 and min(atoms, d_model) = {min(D.shape)}")
    eps = np.finfo(np.float64).eps
    alpha = Y @ D.T  # [B, K] inner products with the targets
    sel = torch.zeros(B, m, dtype=torch.long)
    n_sel = torch.zeros(B, dtype=torch.long)  # atoms chosen per target
    active = torch.ones(B, dtype=torch.bool)
    R = Y.clone()
    gamma = torch.zeros(B, 0, dtype=torch.float64)
    taken = torch.zeros(B, K, dtype=torch.bool)
    for k in range(m):
        lam = (R @ D.T).abs().argmax(1)  # [B]
        # scikit-learn's rules: done when the best atom is one already chosen or its inner
        # product with the target is below machine precision
        active &= (alpha[torch.arange(B), lam] ** 2 >= eps) & ~taken[torch.arange(B), lam]
        # and (unlike it) when the residual is zero to 1e-10 of the target: any atom picked then
        # would be picked by rounding noise, with a coefficient of rounding size
        active &= R.norm(dim=1) > 1e-10 * Y.norm(dim=1)
        if not active.any():
            break
        sel[active, k] = lam[active]
        A = D[sel[:, : k + 1]]  # [B, k+1, d] (inactive rows: their old atoms, ignored)
        G = A @ A.transpose(1, 2)
        L, info = torch.linalg.cholesky_ex(G)
        # the new atom lies in the span of those chosen (within machine precision)
        dep = active & ((info != 0) | ~(L[:, k, k] ** 2 > eps * G[:, k, k]))
        if dep.any():
            active &= ~dep
            sel[dep, k] = 0
        act = active.nonzero()[:, 0]
        if not len(act):
            break
        g = torch.cholesky_solve((A[act] @ Y[act, :, None]), L[act])[..., 0]  # [a, k+1]
        new_gamma = torch.zeros(B, k + 1, dtype=torch.float64)
        new_gamma[:, :k] = gamma
        new_gamma[act] = g
        gamma = new_gamma
        taken[act, lam[act]] = True
        n_sel[act] += 1
        R[act] = Y[act] - (g[:, None, :] @ A[act])[:, 0]
    codes = torch.zeros(B, K, dtype=torch.float64)
    for k in range(gamma.shape[1]):
        rows = (n_sel > k).nonzero()[:, 0]
        codes[rows, sel[rows, k]] = gamma[rows, k]
    return codes.numpy()


class SpanPCA:
    """PCA of bootstrap resamples of each neuron's effect vectors, in its row space.

    Args:
        vectors: ``vectors[j] [N, d]``, neuron ``j``'s effect vectors on ``N`` problems (the
            same ``N`` for all; longer arrays are cut to the shortest).
        tol: singular values below ``tol`` times the largest are the row space's numerical zero;
            default: the machine epsilon of the vectors' own dtype (at least 1e-7, what an
            eigendecomposition of a float64 scatter resolves). Effects stored in float16 carry
            rounding noise near 5e-5 of the top singular value in every direction; below the
            dtype's epsilon a direction is that noise, not structure.

    Each neuron's vectors are written ``X = C Q`` with orthonormal rows ``Q [r, d]`` spanning its
    rows (``r`` padded to the largest over neurons with zero coordinates). A resample of the
    problems with counts ``w`` has centred scatter ``C^T diag(w) C - N mu mu^T`` (``mu = w C / N``)
    in those coordinates; its eigenvectors, mapped back by ``Q``, are those of the resample's
    ``d x d`` scatter, within the vectors' rounding (``tol``). A neuron whose vectors leave a
    residual above ``tol * sqrt(d)`` of their norm keeps ``Q = I`` (no saving, still exact).
    """

    def __init__(self, vectors: Sequence[np.ndarray], tol: float | None = None):
        raw = [np.asarray(v) for v in vectors]
        if tol is None:
            dt = raw[0].dtype if np.issubdtype(raw[0].dtype, np.floating) else np.dtype(np.float64)
            tol = max(float(np.finfo(dt).eps), 1e-7)
        self.tol = tol
        self.N = N = min(len(v) for v in raw)
        J, d = len(raw), raw[0].shape[1]
        # row spaces from the uncentred scatters, a chunk of neurons at a time (batched eigh)
        Qs: list[np.ndarray] = []
        step = max(1, (64 << 20) // max(1, 8 * N * d))
        for j0 in range(0, J, step):
            X = np.stack([v[:N] for v in raw[j0: j0 + step]]).astype(np.float64)  # [j, N, d]
            w, E = np.linalg.eigh(np.matmul(X.transpose(0, 2, 1), X))  # ascending
            w, E = np.clip(w[:, ::-1], 0, None), E[:, :, ::-1]
            for lam, vec in zip(w, E):
                s = np.sqrt(lam)
                r = max(1, int((s > tol * max(s[0], 1e-300)).sum()))
                # the residual's energy is the sum of the dropped eigenvalues (Q has orthonormal rows)
                exact = lam[r:].sum() <= (tol * np.sqrt(d)) ** 2 * max(lam.sum(), 1e-300)
                Qs.append(vec[:, :r].T if exact else np.eye(d))
        self.rank = max(len(Q) for Q in Qs)
        self.Q = np.zeros((J, self.rank, d))
        self.C = np.zeros((J, N, self.rank))
        for j, (v, Q) in enumerate(zip(raw, Qs)):
            self.Q[j, : len(Q)] = Q
            self.C[j, :, : len(Q)] = v[:N].astype(np.float64) @ Q.T

    def counts(self, idx: np.ndarray | None) -> np.ndarray:
        """Resample counts ``[N]`` of index array ``idx`` (``None``: every problem once)."""
        return np.ones(self.N) if idx is None else np.bincount(np.asarray(idx), minlength=self.N).astype(np.float64)

    def scatter(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``[J, r, r]`` centred scatter of each neuron's resampled vectors, in its coordinates."""
        w = self.counts(idx)
        n = w.sum()
        J, N, r = self.C.shape
        out = np.empty((J, r, r))
        step = max(1, (64 << 20) // max(1, 8 * N * r))  # neurons per chunk: at most 64 MiB of scratch
        for j0 in range(0, J, step):
            C = self.C[j0: j0 + step]
            Cw = C * w[None, :, None]
            mu = Cw.sum(1) / n  # [j, r]
            out[j0: j0 + step] = np.matmul(Cw.transpose(0, 2, 1), C) - n * mu[:, :, None] * mu[:, None, :]
        return out

    def components(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(singular values [J, r], directions [J, r, d])`` of each neuron's centred resample,
        largest first (``singular values`` are ``sqrt`` of the scatter's eigenvalues)."""
        w, E = np.linalg.eigh(self.scatter(idx))
        w, E = w[:, ::-1], E[:, :, ::-1]
        return np.sqrt(np.clip(w, 0, None)), np.matmul(E.transpose(0, 2, 1), self.Q)

    def pc1(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``[J, d]`` first principal direction (unit; sign as ``eigh`` gives it) of each neuron's
        resample: :func:`so2lib.phases.concepts.pc1_direction` of ``vectors[j][idx]``."""
        return self.components(idx)[1][:, 0]

    def bases(self, ks: Sequence[int], idx: np.ndarray | None = None, tol: float = 1e-6,
              components: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
        """Orthonormal bases ``[r_j, d]`` (``r_j <= ks[j]``) of each neuron's centred resample, as
        :func:`so2lib.phases.applications.polysemantic.span_basis` gives them (``components``: what
        :meth:`components` returned for ``idx``, to reuse)."""
        s, P = self.components(idx) if components is None else components
        out = []
        for j, k in enumerate(ks):
            r = max(1, min(int(k), int((s[j] > tol * max(s[j, 0], 1e-30)).sum())))
            out.append(P[j, :r])
        return out
