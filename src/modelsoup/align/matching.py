"""Finding the permutations: weight matching (no data) and activation matching (data), and applying them.

A permutation of a group is a ``LongTensor`` ``p`` of its ``size`` units: unit ``i`` of the aligned model is
unit ``p[i]`` of the model. Applying it selects ``p`` (expanded to blocks) along every axis of the group.

Weight matching (Ainsworth et al. 2023, "Git Re-Basin", algorithm 1) maximises the inner product of the
reference's weights with the permuted model's over every tensor the groups touch,
``max_P sum_t <W_ref[t], P(W[t])>``, which minimises ``sum_t |W_ref[t] - P(W[t])|^2`` since a permutation
keeps norms. It is a coordinate descent over the groups: with every other permutation fixed, the terms of
group ``g`` are linear in ``P_g``, ``<P_g, C_g>`` with ``C_g[i, j] = sum_{(t, axis) in g} <W_ref[t]_i, W'[t]_j>``
(unit ``i`` of the reference, unit ``j`` of the model with the other groups' permutations applied), a
linear assignment problem (``scipy.optimize.linear_sum_assignment``). Groups are visited in a random order
per sweep (seeded), a step is kept only if it raises the objective, and the sweeps stop when none does (or
after ``max_iter``): the weight distance never increases.

Activation matching (Ainsworth et al. 2023, section 3.1; Li et al. 2016, Tatro et al. 2020) runs both models
on the same batches and, per group, matches unit ``i`` of the reference with the unit ``j`` of the model whose
activations correlate most: ``max_P sum_i corr(z_ref_i, z_{P(i)})`` (Pearson correlation over examples and
positions, averaged over the group's sites). Units that span a block of features (attention heads) are
compared by linear CKA (Kornblith et al. 2019), which does not depend on the order of a head's own dims.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import short_list
from .spec import AlignmentError, Axis, Group, PermutationSpec, Site, fx_trace

log = logging.getLogger("modelsoup")

Perms = dict[str, torch.Tensor]


def _lsa(cost: torch.Tensor) -> torch.Tensor:
    """The permutation maximising ``sum_i cost[i, p[i]]``."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn (the demo extra)
        raise AlignmentError("permutation alignment needs scipy (linear_sum_assignment): pip install scipy") from None
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy(), maximize=True)
    out = torch.empty(cost.shape[0], dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return out


def identity(spec: PermutationSpec) -> Perms:
    """The identity permutation of every group."""
    return {g.name: torch.arange(g.size) for g in spec.groups}


def invert(p: torch.Tensor) -> torch.Tensor:
    """``q`` with ``q[p[i]] = i``."""
    q = torch.empty_like(p)
    q[p] = torch.arange(len(p))
    return q


def compose(first: Perms, then: Perms) -> Perms:
    """The permutation applying ``first`` and then ``then``: ``apply(apply(s, first), then) == apply(s, compose(first, then))``."""
    return {k: first[k][then[k]] for k in first}


def _index(p: torch.Tensor, block: int) -> torch.Tensor:
    return p if block == 1 else (p[:, None] * block + torch.arange(block)).reshape(-1)


def _permute(t: torch.Tensor, entries: Iterable[tuple[str, Axis]], perms: Perms, skip: tuple[str, int] | None = None) -> torch.Tensor:
    for gname, a in entries:
        if skip is not None and (gname, a.axis) == skip:
            continue
        t = t.index_select(a.axis, _index(perms[gname], a.block).to(t.device))
    return t


def apply_permutation(spec: PermutationSpec, state: Mapping[str, torch.Tensor], perms: Perms) -> dict[str, torch.Tensor]:
    """A new state with every group's permutation applied to its tensor axes (``state`` is not modified).

    ``out[t]`` is ``state[t]`` with ``index_select(axis, p)`` per axis of ``t`` in the spec (``p`` expanded to
    ``block`` entries per unit); tensors no group touches are the same objects. Exact: dtypes are kept.

    Raises:
        AlignmentError: a group without a permutation, a permutation of the wrong length or not a permutation.
    """
    for g in spec.groups:
        p = perms.get(g.name)
        if p is None:
            raise AlignmentError(f"no permutation given for group '{g.name}'")
        if p.shape != (g.size,) or not torch.equal(torch.sort(p.long()).values, torch.arange(g.size)):
            raise AlignmentError(f"group '{g.name}': the permutation is not a permutation of its {g.size} units")
    out = dict(state)
    for name, entries in spec.by_tensor().items():
        if name not in state:
            raise AlignmentError(f"tensor '{name}' of the spec is not in the state")
        out[name] = _permute(state[name], entries, {k: v.long() for k, v in perms.items()})
    return out


def _flat(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(n, -1)


def weight_distance(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> float:
    """``sqrt(sum_t |reference[t] - state[t]|^2)`` over ``names`` (default: every floating tensor of ``reference``), in float64."""
    names = [n for n in reference if reference[n].is_floating_point()] if names is None else list(names)
    total = torch.zeros((), dtype=torch.float64)
    for n in names:
        total += (reference[n].double() - state[n].double()).pow(2).sum()
    return float(total.sqrt())


def weight_matching(spec: PermutationSpec, reference_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, init: Perms | None = None) -> Perms:
    """Permutations of ``state``'s units that bring its weights closest to ``reference_state`` (Git Re-Basin weight matching).

    ``argmax_P sum_t <W_ref[t], P(W[t])>`` by coordinate descent over the groups (module doc), in float64.

    Args:
        spec: the groups (checked against ``reference_state``).
        reference_state: the weights to match.
        state: the model to permute (same names and shapes).
        seed: the random order of the groups in each sweep.
        max_iter: sweeps at most.
        init: permutations to start from (default: identity).

    Returns:
        group name -> permutation (apply with :func:`apply_permutation`).

    Raises:
        AlignmentError: the spec does not fit, or the states differ in a tensor the spec touches.
    """
    return weight_matching_run(spec, reference_state, state, seed=seed, max_iter=max_iter, init=init)[0]


def weight_matching_run(spec: PermutationSpec, reference_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
                        seed: int = 0, max_iter: int = 100, init: Perms | None = None) -> tuple[Perms, int]:
    """:func:`weight_matching`, also returning the number of sweeps run."""
    import numpy as np

    spec.check({k: tuple(v.shape) for k, v in reference_state.items()}, "the reference")
    by_tensor = spec.by_tensor()
    for name in by_tensor:
        if name not in state or tuple(state[name].shape) != tuple(reference_state[name].shape):
            raise AlignmentError(f"tensor '{name}': the model's {list(state[name].shape) if name in state else 'is missing'} does not match the "
                                 f"reference's {list(reference_state[name].shape)}; align models of one architecture")
    ref = {n: reference_state[n].detach().double() for n in by_tensor}
    cur = {n: state[n].detach().double() for n in by_tensor}
    perms = {k: v.clone().long() for k, v in (init or identity(spec)).items()}
    rng = np.random.default_rng(seed)
    groups = list(spec.groups)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        changed = False
        for k in rng.permutation(len(groups)):
            g = groups[int(k)]
            new, gain = _best_for_group(g, ref, cur, by_tensor, perms)
            if gain:
                perms[g.name] = new
                changed = True
        if not changed:
            break
    else:
        log.warning("weight matching: still improving after %d sweeps (max_iter); the permutations may not be a local optimum", max_iter)
    return perms, sweeps


def _best_for_group(g: Group, ref: Mapping[str, torch.Tensor], cur: Mapping[str, torch.Tensor], by_tensor: Mapping[str, list[tuple[str, Axis]]],
                    perms: Perms) -> tuple[torch.Tensor, bool]:
    n = g.size
    cost = torch.zeros(n, n, dtype=torch.float64)
    for a in g.axes:
        w = _permute(cur[a.tensor], by_tensor[a.tensor], perms, skip=(g.name, a.axis))
        cost += _flat(ref[a.tensor], a.axis, n) @ _flat(w, a.axis, n).T
    new = _lsa(cost)
    old = perms[g.name]
    if torch.equal(new, old):
        return old, False
    if all(sum(1 for gn, _ in by_tensor[t] if gn == g.name) == 1 for t in g.tensors()):
        rows = torch.arange(n)
        before, after = float(cost[rows, old].sum()), float(cost[rows, new].sum())
    else:  # the group touches a tensor on two axes: its terms are quadratic in P_g, compare the true objective
        def objective(p: torch.Tensor) -> float:
            trial = {**perms, g.name: p}
            return sum(float((ref[t] * _permute(cur[t], by_tensor[t], trial)).sum()) for t in g.tensors())

        before, after = objective(old), objective(new)
    return new, after > before + 1e-12 * max(1.0, abs(before))


# -- activations ---------------------------------------------------------------------------------------------------


def batch_inputs(batch: Any, labels_key: str = "labels") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of a forward pass on ``batch``: a tensor; a tuple/list whose first item is the input
    (``(x, y)`` as ``torch.optim.swa_utils.update_bn`` takes it); or a mapping of keyword inputs (``labels_key`` left out)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != labels_key}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise AlignmentError(f"a batch is a {type(batch).__name__}; give tensors, (inputs, labels) tuples or mappings of keyword inputs")


class ActivationCapture:
    """Runs a module on a batch and returns its values at some sites (fx nodes or module outputs).

    Node sites run the module's fx trace through an interpreter that keeps those nodes' outputs; module
    sites use forward hooks on the module itself.
    """

    def __init__(self, module: nn.Module, sites: Iterable[Site]) -> None:
        self.module = module
        self.sites = list(dict.fromkeys(sites))
        self.node_sites = {s.name for s in self.sites if s.kind == "node"}
        self.gm = fx_trace(module) if self.node_sites else None
        if self.gm is not None:
            known = {n.name for n in self.gm.graph.nodes}
            missing = sorted(self.node_sites - known)
            if missing:
                raise AlignmentError(f"sites {short_list(missing)} are not nodes of {type(module).__name__}'s trace; the spec was made for another model")
        mods = dict(module.named_modules())
        missing = [s.name for s in self.sites if s.kind == "module" and s.name not in mods]
        if missing:
            raise AlignmentError(f"sites {short_list(missing)} are not modules of {type(module).__name__}; fix the spec's sites")

    def __call__(self, batch: Any) -> dict[Site, torch.Tensor]:
        args, kwargs = batch_inputs(batch)
        got: dict[str, Any] = {}
        handles = []
        mods = dict(self.module.named_modules())
        for s in self.sites:
            if s.kind == "module":
                handles.append(mods[s.name].register_forward_hook(lambda m, i, o, name=s.name: got.__setitem__(name, o)))
        try:
            with torch.no_grad():
                if self.gm is not None:
                    if kwargs:
                        order = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
                        args = tuple(kwargs[k] for k in order if k in kwargs)
                    _Recorder(self.gm, self.node_sites, got).run(*args)
                else:
                    self.module(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for s in self.sites:
            v = got.get(s.name)
            if s.output_index is not None and isinstance(v, (tuple, list)):
                v = v[s.output_index]
            if not isinstance(v, torch.Tensor):
                raise AlignmentError(f"site '{s.name}' gave no tensor (a {type(v).__name__}); set output_index in the spec's site")
            out[s] = v
        return out


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: Any, names: set[str], got: dict[str, Any]) -> None:
        super().__init__(gm)
        self.names, self.got = names, got

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.got[n.name] = out
        return out


def unit_view(t: torch.Tensor, site: Site, size: int) -> torch.Tensor:
    """``(observations, features)`` of a site's value: ``size`` columns, or ``size * block`` when a unit is a block of features."""
    t = t.detach().double().movedim(site.dim, -1)
    if t.shape[-1] != size * site.block:
        raise AlignmentError(f"site '{site.name}': dim {site.dim} has {t.shape[-1]} entries, the group's {size} units x block {site.block} "
                             f"need {size * site.block}")
    if site.block_as == "features" or site.block == 1:
        return t.reshape(-1, size * site.block)
    return t.reshape(-1, size, site.block).transpose(1, 2).reshape(-1, size)


class _Moments:
    """Running sums for the cross-correlation of two sets of features (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.sa: torch.Tensor | Any = 0.0
        self.sb: torch.Tensor | Any = 0.0
        self.saa: torch.Tensor | Any = 0.0
        self.sbb: torch.Tensor | Any = 0.0
        self.sab: torch.Tensor | Any = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, full: bool) -> None:
        self.n += a.shape[0]
        self.sa = self.sa + a.sum(0)
        self.sb = self.sb + b.sum(0)
        self.sab = self.sab + a.T @ b
        self.saa = self.saa + (a.T @ a if full else (a * a).sum(0))
        self.sbb = self.sbb + (b.T @ b if full else (b * b).sum(0))

    def correlation(self) -> torch.Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - ma[:, None] * mb[None, :]
        sa = (self.saa / self.n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / self.n - mb * mb).clamp_min(0).sqrt()
        return torch.nan_to_num(cov / (sa[:, None] * sb[None, :]), nan=0.0, posinf=0.0, neginf=0.0)

    def block_cka(self, size: int, block: int) -> torch.Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        cab = (self.sab / self.n - ma[:, None] * mb[None, :]).reshape(size, block, size, block)
        caa = (self.saa / self.n - ma[:, None] * ma[None, :]).reshape(size, block, size, block)
        cbb = (self.sbb / self.n - mb[:, None] * mb[None, :]).reshape(size, block, size, block)
        num = cab.pow(2).sum((1, 3))
        na = torch.diagonal(caa, dim1=0, dim2=2).pow(2).sum((0, 1)).sqrt()
        nb = torch.diagonal(cbb, dim1=0, dim2=2).pow(2).sum((0, 1)).sqrt()
        return torch.nan_to_num(num / (na[:, None] * nb[None, :]), nan=0.0, posinf=0.0, neginf=0.0)


def activation_similarity(spec: PermutationSpec, ref_module: nn.Module, module: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per group, ``S[i, j]``: the similarity of the reference's unit ``i`` and the model's unit ``j`` over ``batches``
    (mean over the group's sites of the Pearson correlation, or of linear CKA for units that are blocks of features).

    Raises:
        AlignmentError: a group without sites, sites that do not fit the modules, no batches.
    """
    nosite = [g.name for g in spec.groups if not g.sites]
    if nosite:
        raise AlignmentError(f"groups {short_list(nosite)} have no activation sites in the spec; add sites (module outputs) to a declared spec, "
                             "or use weight matching (--method weight)")
    sites = [s for g in spec.groups for s in g.sites]
    cap_ref, cap = ActivationCapture(ref_module, sites), ActivationCapture(module, sites)
    moments: dict[tuple[str, Site], _Moments] = {(g.name, s): _Moments() for g in spec.groups for s in g.sites}
    was = ref_module.training, module.training
    ref_module.eval()
    module.eval()
    try:
        seen = 0
        for batch in batches:
            za, zb = cap_ref(batch), cap(batch)
            for g in spec.groups:
                for s in g.sites:
                    moments[(g.name, s)].add(unit_view(za[s], s, g.size), unit_view(zb[s], s, g.size), full=s.block_as == "features" and s.block > 1)
            seen += 1
    finally:
        ref_module.train(was[0])
        module.train(was[1])
    if not seen:
        raise AlignmentError("activation matching got no batches; give data (--data)")
    out = {}
    for g in spec.groups:
        mats = [moments[(g.name, s)].block_cka(g.size, s.block) if s.block_as == "features" and s.block > 1 else moments[(g.name, s)].correlation()
                for s in g.sites]
        out[g.name] = torch.stack(mats).mean(0)
    return out


def activation_matching(spec: PermutationSpec, ref_module: nn.Module, module: nn.Module, batches: Iterable[Any]) -> Perms:
    """Permutations of ``module``'s units that best match ``ref_module``'s activations on ``batches`` (activation matching).

    Per group, ``argmax_P sum_i S[i, P(i)]`` for the similarity ``S`` of :func:`activation_similarity` (Pearson
    correlation of the units' activations; linear CKA for attention heads), a linear assignment problem.
    The groups are matched independently, each from the activations of the unpermuted models (a unit's
    activation does not depend on how the other groups are ordered).

    Args:
        spec: the groups, with their activation sites.
        ref_module: the reference model (its weights loaded).
        module: the model to permute (the same architecture).
        batches: inputs (tensors, ``(x, y)`` tuples or keyword mappings), the same for both models.

    Returns:
        group name -> permutation.
    """
    return {k: _lsa(s) for k, s in activation_similarity(spec, ref_module, module, batches).items()}
