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
- :func:`single_threaded` and :func:`map_replicates`: bootstrap replicates are many small
  matrices, where the BLAS and torch thread pools only contend; they run with one thread each, and
  the replicates themselves on a few Python threads (numpy and torch release the GIL in their
  kernels). Each replicate draws from its own generator, so the results do not depend on how many
  threads ran them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

_LOCK = threading.Lock()
_DEPTH = [0]
_SAVED: list[Any] = []


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS thread (threadpoolctl) and one torch intra-op thread within the context; nested
    and concurrent uses from several Python threads are safe (the outermost one restores)."""
    from threadpoolctl import threadpool_limits

    with _LOCK:
        if _DEPTH[0] == 0:
            _SAVED[:] = [torch.get_num_threads(), threadpool_limits(1)]
            torch.set_num_threads(1)
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                threads, limits = _SAVED
                torch.set_num_threads(threads)
                limits.restore_original_limits()
                _SAVED.clear()


def workers() -> int:
    """Python threads for :func:`map_replicates`: ``SO2LIB_WORKERS``, else the CPUs this process may
    use, at most 4 (the GIL bounds the gain beyond that)."""
    env = os.environ.get("SO2LIB_WORKERS")
    if env:
        return max(1, int(env))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n))


def float32_mean(v: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``np.asarray(v, np.float32).mean(0)``, bit for bit, without the float32 copy of all of ``v``
    (``[N, ...]``, e.g. a float16 memory map of effect vectors): numpy sums a float32 array over its
    first axis row after row, so the rows are added in that order from ``chunk``-row float32 blocks,
    then divided by ``N`` (tested equal to numpy's)."""
    acc = np.zeros(v.shape[1:], np.float32)
    for c0 in range(0, len(v), chunk):
        for row in np.asarray(v[c0:c0 + chunk], dtype=np.float32):
            acc += row
    return acc / np.float32(len(v))


def map_replicates(fn: Callable[[int], Any], n: int, n_workers: int | None = None,
                   desc: str | None = None) -> list[Any]:
    """``[fn(0), ..., fn(n - 1)]``, single-threaded kernels, on ``n_workers`` Python threads
    (:func:`workers`), with a progress bar when ``desc`` is given. ``fn`` must not share mutable
    state between replicates; results are in order, so a replicate's value does not depend on the
    thread count."""
    from so2lib.runs.progress import tqdm

    k = workers() if n_workers is None else max(1, n_workers)
    with single_threaded():
        if k == 1 or n <= 1:
            return [fn(i) for i in tqdm(range(n), desc=desc, disable=desc is None)]
        with ThreadPoolExecutor(max_workers=k) as ex:
            return list(tqdm(ex.map(fn, range(n)), total=n, desc=desc, disable=desc is None))


def omp(directions: np.ndarray, dictionary: np.ndarray, m: int) -> np.ndarray:
    """OMP codes ``[B, K]`` (at most ``m`` non-zeros per row) of ``directions [B, d]`` over the
    atoms ``dictionary [K, d]`` (rows), in float64.

    Each step picks, for every target, the atom of largest ``|<atom, residual>|`` (the first on
    ties, as ``numpy.argmax``), refits the coefficients of the chosen atoms by least squares and
    updates the residual. A target stops early, as scikit-learn's does, when the best atom is one
    already chosen or has an inner product with the target below machine precision, or when the
    next atom is linearly dependent on those chosen; and also when its residual is zero to 1e-10
    of the target (scikit-learn would then pick an atom by rounding noise)."""
    with single_threaded():  # small batched ops: on shared cores, more threads only contend
        return _omp(directions, dictionary, m)


def _omp(directions: np.ndarray, dictionary: np.ndarray, m: int) -> np.ndarray:
    Y = torch.as_tensor(np.asarray(directions, np.float64))
    D = torch.as_tensor(np.asarray(dictionary, np.float64))
    B, K = Y.shape[0], D.shape[0]
    d = D.shape[1]
    if not 1 <= m <= min(D.shape):
        raise ValueError(f"sparsity m={m} must be between 1 and min(atoms, d_model) = {min(D.shape)}")
    eps = np.finfo(np.float64).eps
    alpha = Y @ D.T  # [B, K] inner products with the targets
    rows = torch.arange(B)
    sel = torch.zeros(B, m, dtype=torch.long)
    n_sel = torch.zeros(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    gamma = torch.zeros(B, m, dtype=torch.float64)
    taken = torch.zeros(B, K, dtype=torch.bool)
    A = torch.zeros(B, m, d, dtype=torch.float64)  # chosen atoms, filled one column per step
    G = torch.eye(m, dtype=torch.float64).repeat(B, 1, 1)  # their Gram (identity padding)
    ynorm = Y.norm(dim=1)
    R = Y
    for k in range(m):
        lam = (R @ D.T).abs().argmax(1)  # [B]
        # scikit-learn's rules: done when the best atom is one already chosen or its inner
        # product with the target is below machine precision
        active &= (alpha[rows, lam] ** 2 >= eps) & ~taken[rows, lam]
        # and (unlike it) when the residual is zero to 1e-10 of the target: any atom picked then
        # would be picked by rounding noise, with a coefficient of rounding size
        active &= R.norm(dim=1) > 1e-10 * ynorm
        if not active.any():
            break
        # every buffer is updated for all rows at once (no per-step copies of the active rows);
        # a row that stops keeps its coefficients and gets its padding back below
        s_k = torch.where(active, lam, sel[:, k])
        sel[:, k] = s_k
        A[:, k] = D[s_k]
        # the new atom's inner products with those chosen (from the atoms: a dictionary can be a
        # whole vocabulary, whose K x K Gram would not fit in memory)
        g_row = torch.bmm(A[:, : k + 1], A[:, k, :, None])[..., 0]  # [B, k+1]
        G[:, k, : k + 1] = g_row
        G[:, : k + 1, k] = g_row
        Gk = G[:, : k + 1, : k + 1]
        L, info = torch.linalg.cholesky_ex(Gk)
        # the new atom lies in the span of those chosen (within machine precision)
        dep = active & ((info != 0) | ~(L[:, k, k] ** 2 > eps * Gk[:, k, k]))
        active &= ~dep
        if not active.any():
            break
        rhs = alpha.gather(1, sel[:, : k + 1])[..., None]
        g = torch.cholesky_solve(rhs, torch.where(active[:, None, None], L, torch.eye(k + 1, dtype=L.dtype)))[..., 0]
        gamma[:, : k + 1] = torch.where(active[:, None], g, gamma[:, : k + 1])
        taken[rows[active], lam[active]] = True
        n_sel += active
        # inactive rows: restore the identity padding of step k's Gram and atom
        if (~active).any():
            ina = ~active
            G[ina, k, :] = 0; G[ina, :, k] = 0; G[ina, k, k] = 1
            A[ina, k] = 0
        R = Y - torch.bmm(gamma[:, None, : k + 1], A[:, : k + 1])[:, 0]
    codes = torch.zeros(B, K, dtype=torch.float64)
    keep = torch.arange(m)[None] < n_sel[:, None]
    codes.scatter_add_(1, sel, torch.where(keep, gamma, torch.zeros_like(gamma)))
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
        coords: list[np.ndarray] = []  # [N, r_j] each
        step = max(1, (64 << 20) // max(1, 8 * N * d))
        for j0 in range(0, J, step):
            X = np.stack([v[:N] for v in raw[j0: j0 + step]]).astype(np.float64)  # [j, N, d]
            w, E = np.linalg.eigh(np.matmul(X.transpose(0, 2, 1), X))  # ascending
            w, E = np.clip(w[:, ::-1], 0, None), E[:, :, ::-1]
            for x, lam, vec in zip(X, w, E):
                s = np.sqrt(lam)
                r = max(1, int((s > tol * max(s[0], 1e-300)).sum()))
                # the residual's energy is the sum of the dropped eigenvalues (Q has orthonormal rows)
                exact = lam[r:].sum() <= (tol * np.sqrt(d)) ** 2 * max(lam.sum(), 1e-300)
                Qs.append(vec[:, :r].T if exact else np.eye(d))
                coords.append(x @ Qs[-1].T)
        self.rank = max(len(Q) for Q in Qs)
        self.Q = np.zeros((J, self.rank, d))
        for j, Q in enumerate(Qs):
            self.Q[j, : len(Q)] = Q
        # coordinates grouped by rank: a neuron's scatter costs its own r^2, not the largest one's
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []  # (neuron indices, C [j, N, r])
        for r in sorted({len(Q) for Q in Qs}):
            js = np.array([j for j, Q in enumerate(Qs) if len(Q) == r])
            self._groups.append((js, np.stack([coords[j] for j in js])))

    @property
    def C(self) -> np.ndarray:
        """``[J, N, r]`` every neuron's coordinates (zero-padded to the largest rank)."""
        out = np.zeros((len(self.Q), self.N, self.rank))
        for js, C in self._groups:
            out[js, :, : C.shape[2]] = C
        return out

    def counts(self, idx: np.ndarray | None) -> np.ndarray:
        """Resample counts ``[N]`` of index array ``idx`` (``None``: every problem once)."""
        return np.ones(self.N) if idx is None else np.bincount(np.asarray(idx), minlength=self.N).astype(np.float64)

    def scatter(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``[J, r, r]`` centred scatter of each neuron's resampled vectors, in its coordinates."""
        w = self.counts(idx)
        n = w.sum()
        out = np.zeros((len(self.Q), self.rank, self.rank))
        for js, Cg in self._groups:
            _, N, r = Cg.shape
            step = max(1, (64 << 20) // max(1, 8 * N * r))  # neurons per chunk: at most 64 MiB of scratch
            for j0 in range(0, len(js), step):
                C = Cg[j0: j0 + step]
                mu = np.matmul(w, C) / n  # [j, r]
                out[js[j0: j0 + step], :r, :r] = (np.matmul(C.transpose(0, 2, 1) * w, C)
                                                   - n * mu[:, :, None] * mu[:, None, :])
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
