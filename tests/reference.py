"""Slow, obviously-correct reference implementations: explicit Python loops over elements, in float64.

Each takes lists of small tensors and returns a float64 tensor. They share no code with the library.
"""

from __future__ import annotations

import itertools
import math
import struct

import torch


def _flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.double().reshape(-1)]


def _out(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


def linear(tensors, weights, normalize=True):
    cols = [_flat(t) for t in tensors]
    total = sum(weights)
    out = []
    for i in range(len(cols[0])):
        s = sum(w * c[i] for w, c in zip(weights, cols))
        out.append(s / total if normalize else s)
    return _out(out, tensors[0])


def ema(tensors, decay):
    e = _flat(tensors[0])
    for t in tensors[1:]:
        x = _flat(t)
        e = [decay * a + (1 - decay) * b for a, b in zip(e, x)]
    return _out(e, tensors[0])


def task_arithmetic(tensors, base, weights, scale=1.0, normalize=False):
    b = _flat(base)
    cols = [_flat(t) for t in tensors]
    out = []
    for i in range(len(b)):
        s = sum(w * (c[i] - b[i]) for w, c in zip(weights, cols))
        if normalize:
            s /= sum(weights)
        out.append(b[i] + scale * s)
    return _out(out, base)


def top_k_mask(delta, density, at_least_one=False):
    """Keep the k largest |values|; ties broken by lower flat index first (by sorting index pairs).

    k = floor(density * n); ``at_least_one`` (mergekit's TIES): at least 1 for a positive density.
    """
    vals = _flat(delta)
    k = int(density * len(vals))
    if at_least_one and density > 0 and vals:
        k = max(k, 1)
    ranked = sorted(range(len(vals)), key=lambda i: (-abs(vals[i]), i))
    keep = set(ranked[:k])
    return [1.0 if i in keep else 0.0 for i in range(len(vals))]


def outlier_mask(delta, density, gamma):
    vals = _flat(delta)
    n = len(vals)
    if density >= 1:
        return [1.0] * n
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = n - n_keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ranked = sorted(range(n), key=lambda i: (abs(vals[i]), i))  # ascending, stable
    keep = set(ranked[n_bot : n - n_top])
    return [1.0 if i in keep else 0.0 for i in range(n)]


def sign_merge(deltas, weights, *, sign_method="sum", sign_from="weighted", normalize=True, divide_by="weight_sum"):
    """TIES election + disjoint (weighted) mean of already-sparsified deltas (lists of floats)."""
    n = len(deltas[0])
    out = []
    for i in range(n):
        voters = [(w * d[i] if sign_from == "weighted" else d[i]) for w, d in zip(weights, deltas)]
        vote = sum(voters) if sign_method == "sum" else sum((v > 0) - (v < 0) for v in voters)
        elected = 1 if vote >= 0 else -1
        num, den = 0.0, 0.0
        for w, d, v in zip(weights, deltas, voters):
            s = (v > 0) - (v < 0)
            if s == elected:
                num += w * d[i]
                den += w if divide_by == "weight_sum" else 1.0
        if normalize:
            if divide_by == "weight_sum":
                den = den if abs(den) >= 1e-8 else 1.0
            else:
                den = max(den, 1.0)
            num /= den
        out.append(num)
    return out


def _l1_rescaled(kept, d, rescale):
    """``kept`` (a trimmed ``d``) scaled to the L1 norm of ``d`` (``rescale="l1"``, unless |kept|_1 <= 1e-7), or as it is."""
    new = sum(abs(x) for x in kept)
    if rescale == "none" or new <= 1e-7:
        return kept
    return [x * sum(abs(y) for y in d) / new for x in kept]


def ties(tensors, base, weights, density, scale=1.0, *, rescale="none", keep_at_least_one=False, **conv):
    b = _flat(base)
    deltas = []
    for t, p in zip(tensors, density):
        d = [x - y for x, y in zip(_flat(t), b)]
        m = top_k_mask(t.double() - base.double(), p, keep_at_least_one)
        deltas.append(_l1_rescaled([x * y for x, y in zip(d, m)], d, rescale))
    merged = sign_merge(deltas, weights, **conv)
    return _out([bi + scale * mi for bi, mi in zip(b, merged)], base)


def _rescaled(d, m, p, rescale):
    """DARE's survivors d * m of one task vector, rescaled: by 1/p, to the L1 norm of d, or not at all."""
    kept = [x * y for x, y in zip(d, m)]
    if rescale == "density":
        return [x / p for x in kept]
    if rescale == "l1":
        new = sum(abs(x) for x in kept)
        if new <= 1e-7:  # nothing (or next to nothing) survived: left as it is
            return kept
        return [x * sum(abs(y) for y in d) / new for x in kept]
    return kept


def dare(tensors, base, weights, masks, density, *, ties_style, scale=1.0, rescale="density", normalize=None, **conv):
    """DARE with explicit 0/1 masks, rescaled by 1/density (``rescale="density"``), to each task vector's L1
    norm (``"l1"``) or not (``"none"``); then a weighted sum, or with ``ties_style`` sign election.

    ``normalize`` defaults to the method's: True for dare_ties, False for dare_linear (divide by sum_i w_i).
    """
    normalize = ties_style if normalize is None else normalize
    b = _flat(base)
    deltas = []
    for t, m, p in zip(tensors, masks, density):
        d = [x - y for x, y in zip(_flat(t), b)]
        deltas.append(_rescaled(d, _flat(m), p, rescale))
    return _add_combined(b, deltas, weights, ties_style, normalize, scale, base, conv)


def _add_combined(b, deltas, weights, ties_style, normalize, scale, base, conv):
    """base + scale * (sign-elected mean, or weighted sum / mean) of the (sparsified) deltas."""
    if ties_style:
        merged = sign_merge(deltas, weights, normalize=normalize, **conv)
    else:
        merged = [sum(w * d[i] for w, d in zip(weights, deltas)) for i in range(len(b))]
        if normalize:
            merged = [x / sum(weights) for x in merged]
    return _out([bi + scale * mi for bi, mi in zip(b, merged)], base)


def _per_model(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def breadcrumbs(tensors, base, weights, density, gamma, scale=1.0, *, sign_method="none", sign_from="weighted", normalize=False,
                divide_by="weight_sum", rescale="none"):
    """Breadcrumbs: each task vector without its smallest and its largest (outlier) magnitudes (scaled back to
    its L1 norm with ``rescale="l1"``), then a weighted sum (divided by sum_i w_i if ``normalize``), or with a
    ``sign_method`` TIES election and disjoint mean."""
    b = _flat(base)
    trimmed = []
    for t, p, g in zip(tensors, _per_model(density, len(tensors)), _per_model(gamma, len(tensors))):
        d = [x - y for x, y in zip(_flat(t), b)]
        m = outlier_mask(t.double() - base.double(), p, g)
        trimmed.append(_l1_rescaled([x * y for x, y in zip(d, m)], d, rescale))
    if sign_method != "none":
        out = sign_merge(trimmed, weights, sign_method=sign_method, sign_from=sign_from, normalize=normalize, divide_by=divide_by)
    else:
        out = [sum(w * d[i] for w, d in zip(weights, trimmed)) for i in range(len(b))]
        if normalize:
            out = [x / sum(weights) for x in out]
    return _out([bi + scale * oi for bi, oi in zip(b, out)], base)


def slerp(v0, v1, t, dot_threshold=0.9995):
    a, b = _flat(v0), _flat(v1)
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    cos = sum(x * y for x, y in zip(a, b)) / (na * nb)
    if abs(cos) > dot_threshold:
        return _out([(1 - t) * x + t * y for x, y in zip(a, b)], v0)
    w = math.acos(cos)
    s0, s1 = math.sin((1 - t) * w) / math.sin(w), math.sin(t * w) / math.sin(w)
    return _out([s0 * x + s1 * y for x, y in zip(a, b)], v0)


def model_stock(tensors, base, filter_wise=False):
    """Model Stock: t = N c / (1 + (N - 1) c) from the mean pairwise cosine c of the task vectors.

    With ``filter_wise`` a tensor of two or more dimensions gets one t per output row (its first index),
    from the cosines of that row's entries. mergekit's edge cases: the norm product in a cosine is at least
    1e-6, a cosine is clipped to [-1, 1], and where 1 + (N - 1) c is within 1e-8 of 0, t = 0 (the base).
    """
    b = _flat(base)
    ds = [[x - y for x, y in zip(_flat(t), b)] for t in tensors]
    n, size = len(ds), len(b)
    rows = base.shape[0] if filter_wise and base.dim() >= 2 else 1
    width = size // rows
    cols = [_flat(x) for x in tensors]
    out = []
    for r in range(rows):
        span = range(r * width, (r + 1) * width)
        coss = []
        for i in range(n):
            for j in range(i + 1, n):
                dot = sum(ds[i][k] * ds[j][k] for k in span)
                ni = math.sqrt(sum(ds[i][k] ** 2 for k in span))
                nj = math.sqrt(sum(ds[j][k] ** 2 for k in span))
                coss.append(min(1.0, max(-1.0, dot / max(ni * nj, 1e-6))))
        c = sum(coss) / len(coss)
        denom = 1 + (n - 1) * c
        t = n * c / denom if abs(denom) > 1e-8 else 0.0
        out += [t * sum(col[k] for col in cols) / n + (1 - t) * b[k] for k in span]
    return _out(out, base)


def ece_equal_width(probs, labels, bins):
    """ECE over bins (b/B, (b+1)/B], confidence 0 in the first bin; one example at a time."""
    rows = [[float(x) for x in r] for r in probs]
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # count, correct, confidence
    for r, y in zip(rows, [int(v) for v in labels]):
        conf = max(r)
        pred = r.index(conf)
        b = 0
        while b < bins - 1 and conf > (b + 1) / bins:
            b += 1
        sums[b][0] += 1
        sums[b][1] += 1.0 if pred == y else 0.0
        sums[b][2] += conf
    n = len(rows)
    return sum(c / n * abs(k / c - s / c) for c, k, s in sums if c)


def ece_equal_mass(probs, labels, bins):
    """ECE over groups of the confidence-sorted examples, sizes differing by at most one, larger first."""
    rows = [[float(x) for x in r] for r in probs]
    items = []
    for i, (r, y) in enumerate(zip(rows, [int(v) for v in labels])):
        conf = max(r)
        items.append((conf, i, 1.0 if r.index(conf) == y else 0.0))
    items.sort()
    n = len(items)
    base, extra = divmod(n, bins)
    total, start = 0.0, 0
    for b in range(bins):
        size = base + (1 if b < extra else 0)
        group = items[start : start + size]
        start += size
        if group:
            acc = sum(g[2] for g in group) / len(group)
            conf = sum(g[0] for g in group) / len(group)
            total += len(group) / n * abs(acc - conf)
    return total


def similarity_stats(models, base=None):
    """Pairwise statistics of models given as lists of tensors (one list per model, same shapes), element by element.

    Returns a dict of nested lists: cosine, distance, and with a base task_cosine, task_norm, cosine_to_base,
    sign_conflicts (opposite signs among coordinates where both task vectors are non-zero) and
    sign_conflict_all (coordinates with both signs among those where two or more are non-zero).
    """
    vecs = [[x for t in m for x in _flat(t)] for m in models]
    n, size = len(vecs), len(vecs[0])

    def dot(a, b):
        return sum(a[k] * b[k] for k in range(size))

    def cos(a, b):
        den = math.sqrt(dot(a, a)) * math.sqrt(dot(b, b))
        return dot(a, b) / den if den else float("nan")

    out = {"norm": [math.sqrt(dot(v, v)) for v in vecs],
           "cosine": [[cos(a, b) for b in vecs] for a in vecs],
           "distance": [[math.sqrt(sum((a[k] - b[k]) ** 2 for k in range(size))) for b in vecs] for a in vecs]}
    if base is None:
        return out
    b = [x for t in base for x in _flat(t)]
    tv = [[v[k] - b[k] for k in range(size)] for v in vecs]
    out["task_cosine"] = [[cos(x, y) for y in tv] for x in tv]
    out["task_norm"] = [math.sqrt(dot(x, x)) for x in tv]
    out["cosine_to_base"] = [cos(v, b) for v in vecs]
    conflicts = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            both = [k for k in range(size) if tv[i][k] != 0 and tv[j][k] != 0]
            opposite = [k for k in both if (tv[i][k] > 0) != (tv[j][k] > 0)]
            conflicts[i][j] = len(opposite) / len(both) if both else float("nan")
    out["sign_conflicts"] = conflicts
    voting = [k for k in range(size) if sum(1 for x in tv if x[k] != 0) >= 2]
    mixed = [k for k in voting if any(x[k] > 0 for x in tv) and any(x[k] < 0 for x in tv)]
    out["sign_conflict_all"] = len(mixed) / len(voting) if voting else float("nan")
    return out


# ---------------------------------------------------------------- mergekit's family (nuslerp ... ram, della)
#
# Each follows mergekit 0.1.5's definition (merge_methods/*.py, sparsify.py), written again as loops.


def _fibers(shape, dim):
    """Flat indices of each 1-D slice of a row-major tensor of ``shape`` along ``dim``, in index order."""
    shape = list(shape)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    others = [range(1) if i == dim else range(s) for i, s in enumerate(shape)]
    out = []
    for idx in itertools.product(*others):
        start = sum(i * s for i, s in zip(idx, strides))
        out.append([start + j * strides[dim] for j in range(shape[dim])])
    return out


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def nuslerp(tensors, weights=None, base=None, *, flatten=True, row_wise=False, eps=1e-8):
    """NuSLERP of two models (of their task vectors with a base): t = w_2 / (w_1 + w_2), 0.5 if that sum is
    below 1e-6; the whole tensor as one vector (``flatten``), else each slice along the last dim (its rows),
    or along dim 0 (its columns) with ``row_wise``. Norms are floored at 1e-7; pairs with 1 - cos^2 <= eps^2
    are interpolated linearly."""
    w = [1.0, 1.0] if weights is None else [float(x) for x in weights]
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    b = _flat(base) if base is not None else [0.0] * tensors[0].numel()
    v0 = [x - y for x, y in zip(_flat(tensors[0]), b)]
    v1 = [x - y for x, y in zip(_flat(tensors[1]), b)]
    shape = tuple(tensors[0].shape)
    if flatten or len(shape) < 2:
        groups = [list(range(len(b)))]
    else:
        groups = _fibers(shape, 0 if row_wise else len(shape) - 1)
    out = [0.0] * len(b)
    for g in groups:
        x, y = [v0[i] for i in g], [v1[i] for i in g]
        nx, ny = max(_norm(x), 1e-7), max(_norm(y), 1e-7)
        cos = min(1.0, max(-1.0, sum(p / nx * q / ny for p, q in zip(x, y))))
        if 1 - cos * cos <= eps * eps:
            r = [(1 - t) * p + t * q for p, q in zip(x, y)]
        else:
            th = math.acos(cos)
            r = [(math.sin((1 - t) * th) * p + math.sin(t * th) * q) / math.sin(th) for p, q in zip(x, y)]
        for i, v in zip(g, r):
            out[i] = v
    return _out([o + bi for o, bi in zip(out, b)], tensors[0])


def multislerp(tensors, weights=None, base=None, *, normalize_weights=True, eps=1e-8):
    """Multi-SLERP: u_i = v_i / (|v_i| + eps), m = sum w_i u_i / |.|, g = sum w_i (u_i - <u_i, m> m),
    result (m cos|g|' + g sin|g|' / |g|') sum w_i |v_i|, |g|' = |g| + eps (v_i the task vectors with a base).
    Where |sum w_i u_i| < eps: two models give w_1 v_1 + w_2 v_2, more raise ValueError."""
    n = len(tensors)
    if n == 1:
        return tensors[0].double().clone()
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    b = _flat(base) if base is not None else [0.0] * tensors[0].numel()
    vs = [[x - y for x, y in zip(_flat(t), b)] for t in tensors]
    size = len(b)
    norms = [_norm(v) for v in vs]
    units = [[x / (nv + eps) for x in v] for v, nv in zip(vs, norms)]
    mean = [sum(wi * u[k] for wi, u in zip(w, units)) for k in range(size)]
    mn = _norm(mean)
    if mn < eps:
        if n != 2:
            raise ValueError("the weighted mean of the directions is zero")
        out = [w[0] * vs[0][k] + w[1] * vs[1][k] for k in range(size)]
    else:
        m = [x / mn for x in mean]
        tangent = [0.0] * size
        for wi, u in zip(w, units):
            dot = sum(p * q for p, q in zip(u, m))
            for k in range(size):
                tangent[k] += wi * (u[k] - dot * m[k])
        tn = _norm(tangent) + eps
        avg = sum(wi * nv for wi, nv in zip(w, norms))
        out = [(m[k] * math.cos(tn) + tangent[k] * math.sin(tn) / tn) * avg for k in range(size)]
    return _out([o + bi for o, bi in zip(out, b)], tensors[0])


def karcher(tensors, weights=None, *, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors with alphas a_i = w_i / sum w (mergekit passes 1/n each).

    Models with |theta_i| <= tol have no direction (their a_i leaves the vote, not the scale); none: zero.
    Start from the normalised mean of the unit vectors (the first unit vector if that mean is shorter than tol);
    each step: tangent = sum a_i theta_i / sin(theta_i) (u_i - cos_i m) over the u_i at an angle >= tol,
    stop if |tangent| < tol, else m = cos|t| m + sin|t| t / |t|, renormalised if |m| > tol. Result: m sum a_i |theta_i|.
    """
    n = len(tensors)
    if n == 1:
        return tensors[0].double().clone()
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    alphas = [x / sum(w) for x in w]
    vecs = [_flat(t) for t in tensors]
    size = len(vecs[0])
    norms = [_norm(v) for v in vecs]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return _out([0.0] * size, tensors[0])
    units = {i: [x / norms[i] for x in vecs[i]] for i in valid}
    a = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    mean = [sum(a[i] * units[i][k] for i in valid) for k in range(size)]
    mn = _norm(mean)
    mean = list(units[valid[0]]) if mn < tol else [x / mn for x in mean]
    for _ in range(max_iter):
        tangent = [0.0] * size
        for i in valid:
            dot = min(1.0, max(-1.0, sum(p * q for p, q in zip(mean, units[i]))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            c = a[i] * theta / math.sin(theta)
            for k in range(size):
                tangent[k] += c * (units[i][k] - dot * mean[k])
        tn = _norm(tangent)
        if tn < tol:
            break
        mean = [math.cos(tn) * p + math.sin(tn) * q / tn for p, q in zip(mean, tangent)]
        un = _norm(mean)
        if un > tol:
            mean = [x / un for x in mean]
    scale = sum(ai * nv for ai, nv in zip(alphas, norms))
    return _out([scale * x for x in mean], tensors[0])


def _f32(x):
    """``x`` rounded to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def sce_keep_count(nnz, select_topk):
    """mergekit's k = int(count_nonzero(var) * select_topk): a 0-d int64 tensor times a Python float is a
    float32 product (both factors and the product rounded to float32), so 100 * 0.57 gives 57, not 56."""
    return int(_f32(_f32(float(nnz)) * _f32(float(select_topk))))


def sce(tensors, base, select_topk=1.0):
    """SCE: keep the k entries of largest (population) variance across the task vectors (k from
    :func:`sce_keep_count` over the entries of nonzero variance; ties in index order), zero the rest; weight
    model i by mean(delta_i^2) / sum_j mean(delta_j^2) (1/n each if that sum is below 1e-6); elect the sign of
    sum_i delta_i (+ at 0), keep the deltas of that sign (a zero has none) and divide by their weights' sum
    (at least 1e-6)."""
    b = _flat(base)
    size, n = len(b), len(tensors)
    ds = [[x - y for x, y in zip(_flat(t), b)] for t in tensors]
    if select_topk < 1:
        var = []
        for k in range(size):
            mu = sum(d[k] for d in ds) / n
            var.append(sum((d[k] - mu) ** 2 for d in ds) / n)
        nnz = sum(1 for v in var if v != 0)
        k = sce_keep_count(nnz, select_topk) if select_topk > 0 else 0
        keep = set(sorted(range(size), key=lambda i: (-var[i], i))[:k])
        ds = [[x if i in keep else 0.0 for i, x in enumerate(d)] for d in ds]
    energy = [sum(x * x for x in d) / size for d in ds]
    total = sum(energy)
    a = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = []
    for k in range(size):
        elected = 1 if sum(d[k] for d in ds) >= 0 else -1
        num = den = 0.0
        for d, ai in zip(ds, a):
            if (d[k] > 0) - (d[k] < 0) == elected:
                num += ai * d[k]
                den += ai
        out.append(b[k] + num / max(den, 1e-6))
    return _out(out, base)


def nearswap(model, base, t):
    """Per entry: w = clamp(t / max(|base - theta|, 1e-6), 0, 1), w theta + (1 - w) base."""
    out = []
    for x, y in zip(_flat(model), _flat(base)):
        w = min(1.0, max(0.0, t / max(abs(y - x), 1e-6)))
        out.append(w * x + (1 - w) * y)
    return _out(out, base)


def _softmax(row):
    top = max(row)
    e = [math.exp(x - top) for x in row]
    s = sum(e)
    return [x / s for x in e]


def arcee_fusion_importance(model, base):
    """|theta - base| times KL(softmax(theta) + 1e-8 || softmax(base) + 1e-8) of its row (slices along the last dim)."""
    th, b = _flat(model), _flat(base)
    shape = tuple(model.shape)
    rows = _fibers(shape, len(shape) - 1) if shape else [[0]]
    imp = [0.0] * len(b)
    for r in rows:
        p = [x + 1e-8 for x in _softmax([th[i] for i in r])]
        q = [x + 1e-8 for x in _softmax([b[i] for i in r])]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        for i in r:
            imp[i] = abs(th[i] - b[i]) * kl
    return imp


def arcee_fusion(model, base):
    """base + delta where the importance is at least median + 1.5 (Q3 - Q1); the quartiles are the sorted
    importances at positions floor(q (n - 1))."""
    th, b = _flat(model), _flat(base)
    imp = arcee_fusion_importance(model, base)
    s = sorted(imp)
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    return _out([y + (x - y) * (1.0 if i >= thr else 0.0) for x, y, i in zip(th, b, imp)], base)


def ram(tensors, base, epsilon=1e-5, *, r=0.0, alpha=0.0):
    """RAM (r = 0) and RAM+ tensor-local: an entry of delta_i is a change where |delta_i| > epsilon; an entry
    changed by one model gets that delta times lambda_i, one changed by several the mean of their deltas.
    lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha) from model i's counts in the tensor."""
    b = _flat(base)
    ds = [[x - y for x, y in zip(_flat(t), b)] for t in tensors]
    size = len(b)
    changed = [[abs(d[k]) > epsilon for k in range(size)] for d in ds]
    count = [sum(c[k] for c in changed) for k in range(size)]
    lam = []
    for c in changed:
        unique = sum(1 for k in range(size) if c[k] and count[k] == 1)
        shared = sum(1 for k in range(size) if c[k] and count[k] > 1)
        lam.append(1.0 + r * min(alpha, max(0.0, shared / max(unique, epsilon))) if unique else 1.0)
    out = []
    for k in range(size):
        v = 0.0
        for d, c, li in zip(ds, changed, lam):
            if c[k]:
                v += d[k] * li if count[k] == 1 else d[k] / count[k]
        out.append(b[k] + v)
    return _out(out, base)


def passthrough(model, scale=1.0):
    return _out([scale * x for x in _flat(model)], model)


def della_keep_probabilities(delta, density, epsilon):
    """DELLA's MagPrune: in each slice along dim 1 (a 1-D tensor is one slice) the entry of magnitude rank r
    (0 = smallest, ties in index order) of m is kept with probability density - epsilon + 2 epsilon r / (m - 1);
    a slice of one entry gets ``density``."""
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError("density -/+ epsilon must lie in (0, 1)")
    vals = _flat(delta)
    shape = tuple(delta.shape)
    slices = [list(range(len(vals)))] if len(shape) < 2 else _fibers(shape, 1)
    probs = [0.0] * len(vals)
    for s in slices:
        m = len(s)
        for rank, i in enumerate(sorted(s, key=lambda i: (abs(vals[i]), i))):
            probs[i] = density if m == 1 else density - epsilon + 2 * epsilon * rank / (m - 1)
    return _out(probs, delta)


def della(tensors, base, weights, masks, probs, *, ties_style, scale=1.0, rescale="density", normalize=None, **conv):
    """DELLA with explicit 0/1 masks and the keep probabilities they were drawn with: survivors divided by their
    own probability (``rescale="density"``), scaled to the delta's L1 norm (``"l1"``) or not (``"none"``); then
    a weighted sum (della_linear, divided by sum_i w_i with ``normalize``) or with ``ties_style`` sign election
    (``normalize`` defaults to True there, to False for della_linear)."""
    normalize = ties_style if normalize is None else normalize
    b = _flat(base)
    deltas = []
    for t, m, p in zip(tensors, masks, probs):
        d = [x - y for x, y in zip(_flat(t), b)]
        kept = [x * y for x, y in zip(d, _flat(m))]
        if rescale == "density":
            kept = [x / q for x, q in zip(kept, _flat(p))]
        deltas.append(_l1_rescaled(kept, d, "l1" if rescale == "l1" else "none"))
    return _add_combined(b, deltas, weights, ties_style, normalize, scale, base, conv)


def fisher_diag(module, xs, ys):
    """Diagonal empirical Fisher by one forward and backward per example: mean of squared gradients of log p(y|x)."""
    params = [p for p in module.parameters()]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in zip(xs, ys):
        module.zero_grad()
        logp = torch.log_softmax(module(x[None]).float(), dim=-1)[0, int(y)]
        logp.backward()
        for s, p in zip(sums, params):
            s += p.grad.double() ** 2
    return [s / len(xs) for s in sums]


def least_squares(x, y):
    """W (out, in) minimising ||x W^T - y||^2, from the normal equations solved one output at a time in float64."""
    x64, y64 = x.double(), y.double()
    g = x64.T @ x64
    return torch.stack([torch.linalg.solve(g, x64.T @ y64[:, j]) for j in range(y64.shape[1])])


def dot_by_rows(x, y, exact=False):
    """<x, y> as modelsoup.methods.reduce defines it, on the whole tensors at once: the products of the flattened tensors
    (float32, float64 if one is; ``exact``: in float64, exact for float32) cut into rows of 1024, each row summed by
    torch in that width, the row sums (and the short last row's) added exactly (math.fsum)."""
    width = torch.float64 if exact or torch.float64 in (x.dtype, y.dtype) else torch.float32
    p = x.reshape(-1).to(width) * y.reshape(-1).to(width)
    full = p.numel() - p.numel() % 1024
    parts = p[:full].view(-1, 1024).sum(dim=1).tolist() + ([float(p[full:].sum())] if full < p.numel() else [])
    return math.fsum(parts)


def karcher_tensor_steps(tensors, weights=None, *, max_iter=10, tol=1e-5):
    """:func:`karcher`'s steps as whole-tensor torch operations (float32 copies of the inputs, float64 ones kept), each
    step a fresh tensor in the textbook order (u_i - dot * m; cos|t| m + (sin|t| / |t|) t), dots and norms as
    :func:`dot_by_rows` takes them. On float64 copies, the truth modelsoup's karcher (the same iteration on the
    coefficients of the mean, from the inputs' Gram matrix) is measured against; on float32 ones, what iterating on
    float32 tensors (mergekit's way) gives."""
    dot = dot_by_rows

    flat = [t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]
    if len(flat) == 1:
        return flat[0].clone().reshape(tensors[0].shape)
    w = [1.0] * len(flat) if weights is None else [float(x) for x in weights]
    alphas = [x / sum(w) for x in w]
    norms = [math.sqrt(dot(f, f)) for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(flat[0]).reshape(tensors[0].shape)
    a = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    mean = torch.zeros_like(flat[0])
    for i in valid:
        mean = torch.add(mean, flat[i] / norms[i], alpha=a[i])  # torch's x + alpha * y, as the method's sums
    mn = math.sqrt(dot(mean, mean))
    mean = flat[valid[0]] / norms[valid[0]] if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            u = flat[i] / norms[i]
            d = max(-1.0, min(1.0, dot(mean, u)))
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent = torch.add(tangent, u - d * mean, alpha=a[i] * theta / math.sin(theta))
        tn = math.sqrt(dot(tangent, tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + (math.sin(tn) / tn) * tangent
        un = math.sqrt(dot(mean, mean))
        if un > tol:
            mean = mean / un
    return (mean * sum(ai * n for ai, n in zip(alphas, norms))).reshape(tensors[0].shape)
