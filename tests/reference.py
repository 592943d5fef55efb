"""Slow, obviously-correct reference implementations: explicit Python loops over elements, in float64.

Each takes lists of small tensors and returns a float64 tensor. They share no code with the library.
"""

from __future__ import annotations

import math

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


def top_k_mask(delta, density):
    """Keep the k largest |values|; ties broken by lower flat index first (by sorting index pairs)."""
    vals = _flat(delta)
    k = int(density * len(vals))
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


def ties(tensors, base, weights, density, scale=1.0, **conv):
    b = _flat(base)
    deltas = []
    for t, p in zip(tensors, density):
        d = [x - y for x, y in zip(_flat(t), b)]
        m = top_k_mask(t.double() - base.double(), p)
        deltas.append([x * y for x, y in zip(d, m)])
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
                divide_by="weight_sum"):
    """Breadcrumbs: each task vector without its smallest and its largest (outlier) magnitudes, then a weighted
    sum (divided by sum_i w_i if ``normalize``), or with a ``sign_method`` TIES election and disjoint mean."""
    b = _flat(base)
    trimmed = []
    for t, p, g in zip(tensors, _per_model(density, len(tensors)), _per_model(gamma, len(tensors))):
        d = [x - y for x, y in zip(_flat(t), b)]
        m = outlier_mask(t.double() - base.double(), p, g)
        trimmed.append([x * y for x, y in zip(d, m)])
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
