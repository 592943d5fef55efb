"""Permutation alignment (modelsoup.align): specs, weight and activation matching, the function check, REPAIR."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsoup.align import (
    ALIGN_RTOL,
    AlignmentError,
    Axis,
    Group,
    PermutationSpec,
    activation_matching,
    align,
    apply_permutation,
    compose,
    config_spec,
    identity,
    invert,
    permutation_spec,
    repair,
    spec_from_dict,
    weight_distance,
    weight_matching,
)
from modelsoup.align.matching import weight_matching_run
from modelsoup.align.repair import channel_stats, interpolate_states, repair_sites
from modelsoup.demo.digits import make_net

from .tolerances import MODEL_OUTPUT


class ResNetTiny(nn.Module):
    """Conv-BN-ReLU, a residual block (the add joins the stream's groups), pooling, flatten (a block permutation of fc's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        r = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(h + self.bn3(self.conv3(r)))
        return self.fc(torch.flatten(self.pool(h), 1))


def resnet(seed: int) -> ResNetTiny:
    torch.manual_seed(seed)
    m = ResNetTiny()
    for bn in (m.bn1, m.bn2, m.bn3):  # statistics and gains of a trained net, so that BN is not the identity
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.8, 1.2)
        bn.bias.data.normal_(0, 0.1)
    return m.eval()


def tiny_bert(seed: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make_net().eval()


def random_perms(spec: PermutationSpec, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}


def inputs_for(name: str) -> torch.Tensor | dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if name == "mlp":
        return torch.randn(256, 64, generator=g)
    if name == "cnn":
        return torch.randn(64, 1, 8, 8, generator=g)
    ids = torch.randint(0, 50, (8, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS = {"mlp": mlp, "cnn": resnet, "bert": tiny_bert}


def build(name: str, seed: int = 0) -> nn.Module:
    return MODELS[name](seed)


def spec_of(name: str, module: nn.Module) -> PermutationSpec:
    x = inputs_for(name)
    return permutation_spec(module, example_inputs=None if isinstance(x, dict) else (x,))


def run(module: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = module(**x) if isinstance(x, dict) else module(x)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def permuted_copy(name: str, module: nn.Module, spec: PermutationSpec, perms) -> nn.Module:
    other = build(name, seed=99)
    other.load_state_dict(apply_permutation(spec, module.state_dict(), perms))
    return other.eval()


# -- specs --------------------------------------------------------------------------------------------------------


def test_mlp_spec_permutes_the_hidden_layers_and_never_the_output():
    spec = permutation_spec(make_net())
    assert [(g.name, g.size) for g in spec.groups] == [("0", 128), ("2", 128)]
    assert spec.groups[0].axes == (Axis("0.weight", 0), Axis("0.bias", 0), Axis("2.weight", 1))
    assert all(a.tensor not in ("4.weight", "4.bias") or a.axis == 1 for g in spec.groups for a in g.axes)
    assert "4" in spec.notes[0]


def test_cnn_spec_joins_the_residual_stream_and_blocks_the_flattened_channels():
    spec = spec_of("cnn", resnet(0))
    by_name = {g.name: g for g in spec.groups}
    stream = next(g for g in spec.groups if any(a.tensor == "bn3.weight" for a in g.axes))
    assert stream.size == 8 and {a.tensor for a in stream.axes} >= {"conv1.weight", "bn1.running_var", "conv3.weight", "conv2.weight"}
    assert Axis("fc.weight", 1, 4) in stream.axes  # 2x2 pooled positions per channel after flatten
    inner = by_name["conv2"]
    assert inner.size == 6 and Axis("conv3.weight", 1) in inner.axes and Axis("bn2.running_mean", 0) in inner.axes
    assert len(spec.groups) == 2


def test_bert_spec_from_the_config_permutes_heads_in_blocks_and_ffn_units():
    spec = permutation_spec(tiny_bert(0))
    assert [(g.name, g.size) for g in spec.groups] == [("layer0.ffn", 24), ("layer0.heads", 4), ("layer1.ffn", 24), ("layer1.heads", 4)]
    heads = spec.group("layer0.heads")
    assert Axis("encoder.layer.0.attention.self.query.weight", 0, 4) in heads.axes
    assert Axis("encoder.layer.0.attention.output.dense.weight", 1, 4) in heads.axes
    assert not any("LayerNorm" in a.tensor or "embeddings" in a.tensor for g in spec.groups for a in g.axes)  # the residual stream stays


class PreNorm(nn.Module):
    """A residual stream under LayerNorm: LayerNorm commutes with a permutation of its features, so the stream is permuted too."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln1, self.fc1, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 12), nn.Linear(12, 8)
        self.ln_f, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        return self.head(self.ln_f(h))


def test_a_residual_stream_under_layernorm_is_one_group_with_the_norms():
    torch.manual_seed(0)
    m = PreNorm().eval()
    for ln in (m.ln1, m.ln_f):
        ln.weight.data.uniform_(0.5, 1.5)
        ln.bias.data.normal_(0, 0.1)
    x = torch.randn(32, 6)
    spec = permutation_spec(m, example_inputs=(x,))
    stream = next(g for g in spec.groups if any(a.tensor == "ln1.weight" for a in g.axes))
    assert {a.tensor for a in stream.axes} >= {"inp.weight", "fc2.weight", "fc2.bias", "ln1.bias", "ln_f.weight", "head.weight"}
    q = random_perms(spec)
    shuffled = PreNorm().eval()
    shuffled.load_state_dict(apply_permutation(spec, m.state_dict(), q))
    with torch.no_grad():
        torch.testing.assert_close(shuffled(x), m(x), **MODEL_OUTPUT)
    p = weight_matching(spec, m.state_dict(), shuffled.state_dict())
    assert all(torch.equal(q[k][p[k]], torch.arange(len(p[k]))) for k in p)


def test_tracing_leaves_the_callers_batchnorm_statistics_alone():
    m = resnet(0).train()
    before = m.bn1.running_mean.clone()
    spec_of("cnn", m)
    assert torch.equal(m.bn1.running_mean, before) and m.training


# -- recovering a permutation of the model itself ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert"])
def test_weight_matching_recovers_a_permutation_of_itself(name):
    model = build(name)
    spec = spec_of(name, model)
    q = random_perms(spec)
    ref = model.state_dict()
    shuffled = apply_permutation(spec, ref, q)
    assert weight_distance(ref, shuffled) > 0.1
    p = weight_matching(spec, ref, shuffled, seed=0)
    assert all(torch.equal(q[k][p[k]], torch.arange(len(p[k]))) for k in p), "identity after composition"
    assert all(torch.equal(v, torch.arange(len(v))) for v in compose(q, p).values())
    assert weight_distance(ref, apply_permutation(spec, shuffled, p)) == 0.0


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert"])
def test_the_permuted_model_computes_the_same_function(name):
    model = build(name)
    spec = spec_of(name, model)
    other = permuted_copy(name, model, spec, random_perms(spec))
    x = inputs_for(name)
    torch.testing.assert_close(run(other, x), run(model, x), **MODEL_OUTPUT)
    assert float((run(other, x) - run(model, x)).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert"])
def test_activation_matching_recovers_a_known_permutation(name):
    model = build(name)
    spec = spec_of(name, model)
    q = random_perms(spec, seed=11)
    other = permuted_copy(name, model, spec, q)
    p = activation_matching(spec, model, other, [inputs_for(name)])
    assert all(torch.equal(q[k][p[k]], torch.arange(len(p[k]))) for k in p)


def test_align_reports_the_permutation_and_a_function_check_near_float_rounding():
    model = build("cnn")
    spec = spec_of("cnn", model)
    other = permuted_copy("cnn", model, spec, random_perms(spec))
    res = align(model, [other], data=[inputs_for("cnn")])
    m = res.models[0]
    assert m.distance_after == 0.0 < m.distance_before
    assert m.max_logit_diff < 1e-5 and m.max_logit_diff <= ALIGN_RTOL * m.logit_scale
    assert {g["name"]: g["moved"] for g in m.groups} and all(0.5 < g["moved"] <= 1.0 for g in m.groups)
    assert all(g["distance_after"] == 0.0 < g["distance_before"] for g in m.groups)
    assert res.to_json()["models"][0]["groups"][0]["size"] in (6, 8)


def test_identity_helpers():
    p = torch.tensor([2, 0, 1])
    assert torch.equal(p[invert(p)], torch.arange(3)) and torch.equal(invert(p)[p], torch.arange(3))
    spec = spec_of("mlp", mlp(0))
    sd = mlp(0).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in apply_permutation(spec, sd, identity(spec)).items())
    q, r = random_perms(spec, 1), random_perms(spec, 2)
    twice = apply_permutation(spec, apply_permutation(spec, sd, q), r)
    once = apply_permutation(spec, sd, compose(q, r))
    assert all(torch.equal(twice[k], once[k]) for k in sd)


# -- weight matching of unrelated models ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weight_matching_never_increases_the_weight_distance(seed):
    a, b = mlp(0).state_dict(), mlp(seed).state_dict()
    spec = permutation_spec(make_net())
    d0 = weight_distance(a, b)
    dists = []
    for it in (1, 2, 3, 100):
        p, sweeps = weight_matching_run(spec, a, b, seed=seed, max_iter=it)
        dists.append(weight_distance(a, apply_permutation(spec, b, p)))
    assert d0 > dists[0] >= dists[1] >= dists[2] >= dists[3] - 1e-9
    assert sweeps < 100  # converged: a sweep changed nothing


def test_weight_matching_is_seeded():
    a, b = mlp(0).state_dict(), mlp(5).state_dict()
    spec = permutation_spec(make_net())
    p1, p2 = weight_matching(spec, a, b, seed=4), weight_matching(spec, a, b, seed=4)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


# -- refusals ------------------------------------------------------------------------------------------------------


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(self.fc1(x), dim=1))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.attn, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(self.attn(h, h, h)[0])


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(("module", "x", "node", "why"), [
    (UnknownOp(), torch.randn(2, 4), "cumsum", "does not know"),
    (GroupedConv(), torch.randn(2, 1, 6, 6), "c2", "grouped convolution (groups=2)"),
    (Attention(), torch.randn(2, 3, 4), "attn", "attention"),
    (Concat(), torch.randn(2, 4), "cat", "concatenates"),
])
def test_what_the_tracer_cannot_follow_is_refused_naming_the_node(module, x, node, why):
    with pytest.raises(AlignmentError, match=f"node '{node}'") as e:
        permutation_spec(module, example_inputs=(x,))
    assert why in str(e.value) and "--spec" in str(e.value)


def test_an_untraceable_module_is_refused_with_the_fix():
    with pytest.raises(AlignmentError, match="torch.fx cannot trace it.*--spec"):
        permutation_spec(Branchy(), example_inputs=(torch.randn(2, 4),))


def test_a_declared_spec_that_does_not_cover_a_shape_is_refused_naming_the_tensor():
    sd = mlp(0).state_dict()
    spec = spec_from_dict({"groups": [{"name": "h1", "size": 100, "axes": [["0.weight", 0], ["0.bias", 0], ["2.weight", 1]]},
                                      {"name": "h2", "size": 128, "axes": [["2.weight", 0], ["nope.weight", 0], ["2.weight", 5]]}]})
    with pytest.raises(AlignmentError) as e:
        spec.check({k: v.shape for k, v in sd.items()})
    msg = str(e.value)
    assert "tensor '0.weight' axis 0 has 128 entries, but the group's 100 units" in msg
    assert "'nope.weight' is not in the model" in msg and "axis 5 does not exist" in msg


def test_a_declared_spec_with_bad_structure_lists_every_problem():
    with pytest.raises(AlignmentError) as e:
        spec_from_dict({"groups": [{"name": "a", "size": -1, "axes": [["x", "0"]]}, {"name": "b", "size": 2}]})
    assert "size -1" in str(e.value) and "axes[0]" in str(e.value) and "(b): axes must be" in str(e.value)


def test_a_spec_that_breaks_the_function_is_refused_with_the_figure_and_nothing_returned():
    model = mlp(0)
    # rows of the first layer permuted but not the columns of the second: not the same function
    wrong = PermutationSpec((Group("h1", 128, (Axis("0.weight", 0), Axis("0.bias", 0))),), "declared")
    other = mlp(1)
    with pytest.raises(AlignmentError, match=r"outputs differ from the original's by up to [0-9.e+-]+ on seeded random inputs .*Nothing was written"):
        align(model, [other], spec=wrong)


class _Sqrt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.sqrt())))  # NaN on the check's random normal inputs


def test_a_check_whose_outputs_are_not_finite_proves_nothing_and_is_refused():
    torch.manual_seed(0)
    a, b = _Sqrt(), _Sqrt()
    wrong = PermutationSpec((Group("h", 16, (Axis("fc1.weight", 0), Axis("fc1.bias", 0))),), "declared")  # fc2's columns left out
    with pytest.raises(AlignmentError, match="hold NaN/Inf, so they cannot show"):
        align(a, [b], spec=wrong, arch=_Sqrt, input_shape=(6,))


class _Capped(nn.Module):
    """Per-unit learned clipping: clamp's tensor argument must follow the units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.cap = nn.Parameter(torch.linspace(0.05, 0.6, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.clamp(torch.relu(self.fc1(x)), max=self.cap))


def test_a_tensor_argument_of_an_elementwise_op_is_permuted_with_the_units():
    spec = permutation_spec(_Capped(), example_inputs=(torch.randn(2, 6),))
    (group,) = spec.groups
    assert ("cap", 0) in {(a.tensor, a.axis) for a in group.axes}
    torch.manual_seed(1)
    a, b = _Capped(), _Capped()
    res = align(a, [b], arch=_Capped, input_shape=(6,))
    aligned = copy.deepcopy(b)
    aligned.load_state_dict(res.models[0].state)
    x = torch.rand(32, 6) * 20  # the caps bind: a cap left in place would change the outputs
    assert torch.allclose(aligned(x), b(x), atol=1e-5)


def test_activation_matching_without_data_and_an_unknown_method_are_refused():
    with pytest.raises(AlignmentError, match="activation matching needs data"):
        align(mlp(0), [mlp(1)], method="activation")
    with pytest.raises(AlignmentError, match="method 'greedy'"):
        align(mlp(0), [mlp(1)], method="greedy")


def test_models_of_different_layouts_are_refused():
    small = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    with pytest.raises(AlignmentError, match="tensor '0.weight' is \\[32, 64\\]"):
        align(mlp(0), [small])


def test_a_config_of_another_family_is_refused():
    with pytest.raises(AlignmentError, match="model_type 'gpt2'.*--spec"):
        config_spec({"model_type": "gpt2", "n_layer": 2})


# -- REPAIR --------------------------------------------------------------------------------------------------------


def test_repair_of_a_model_with_itself_is_the_model():
    m = mlp(0)
    out = repair(m, m, 0.5, [inputs_for("mlp")])
    for k, v in m.state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=1e-4, atol=1e-4)  # up to the eps added to each std


def test_repair_gives_each_hidden_channel_the_interpolated_statistics():
    a, b = mlp(0), mlp(1)
    spec = permutation_spec(make_net())
    b.load_state_dict(apply_permutation(spec, b.state_dict(), weight_matching(spec, a.state_dict(), b.state_dict())))
    batches = [inputs_for("mlp")]
    state = repair(a, b, 0.3, batches, spec=spec)
    fixed = make_net().eval()
    fixed.load_state_dict(state)  # a plain state dict of the same architecture
    sites = repair_sites(spec, fixed, batches[0])
    assert [s for s, _ in sites] == ["0", "2"]
    got = channel_stats(fixed, sites, batches)
    ends = [channel_stats(m, sites, batches) for m in (a, b)]
    for name, _ in sites:
        torch.testing.assert_close(got[name][0], 0.7 * ends[0][name][0] + 0.3 * ends[1][name][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[name][1], 0.7 * ends[0][name][1] + 0.3 * ends[1][name][1], rtol=1e-3, atol=1e-4)
    plain = make_net().eval()
    plain.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.3))
    collapsed = channel_stats(plain, sites, batches)["2"][1].mean()
    assert collapsed < got["2"][1].mean()  # the variance collapse REPAIR undoes


def test_repair_of_a_bn_net_corrects_at_the_batchnorms_after_resetting_them():
    from modelsoup.eval.batchnorm import recalibrate_bn

    a, b = resnet(0), resnet(1)
    batches = [inputs_for("cnn")]
    spec = spec_of("cnn", a)
    reset = repair(a, b, 0.5, batches, variant="reset_bn")
    ref = resnet(5)
    ref.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.5))
    recalibrate_bn(ref, batches)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(reset[k], v)
    sites = repair_sites(spec, a, batches[0])
    assert [s for s, _ in sites] == ["bn1", "bn2", "bn3"]  # each conv is corrected at the BN that follows it
    full = repair(a, b, 0.5, batches, spec=spec)
    m = resnet(6)
    m.load_state_dict(full)
    got = channel_stats(m, sites, batches)
    ends = []
    for x in (a, b):  # the targets: the endpoints' statistics on these batches (their BN reset on them too)
        x = copy.deepcopy(x)
        recalibrate_bn(x, batches)
        ends.append(channel_stats(x, sites, batches))
    for name, _ in sites:
        torch.testing.assert_close(got[name][0], 0.5 * (ends[0][name][0] + ends[1][name][0]), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got[name][1], 0.5 * (ends[0][name][1] + ends[1][name][1]), rtol=1e-3, atol=1e-4)
    # with gains of one sign, REPAIR at a reset BatchNorm is nearly the reset itself (Jordan et al.)
    assert max(float((full[k] - reset[k]).abs().max()) for k in full if full[k].is_floating_point()) < 1e-3


def test_reset_bn_of_a_net_without_batchnorm_is_refused():
    with pytest.raises(AlignmentError, match="no BatchNorm"):
        repair(mlp(0), mlp(1), 0.5, [inputs_for("mlp")], variant="reset_bn")


# -- the verdict's advice -----------------------------------------------------------------------------------------


def test_the_advice_for_models_from_different_starts_points_to_soup_align():
    from modelsoup.analysis.verdict import Reason, verdict

    for code in ("weight_cosine", "score_barrier", "loss_barrier"):
        v = verdict([Reason("stop", code, "models do not share a base: ...")])
        assert any("soup align A B" in a and "soup curve A B --align" in a for a in v.advice), code
    v = verdict([Reason("stop", "nonfinite", "NaN")])
    assert not any("soup align" in a for a in v.advice)


# -- MiniLM (slow) -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_aligned_to_a_permutation_of_itself(minilm_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from modelsoup.align import save_aligned
    from modelsoup.io.output import copy_model_files

    ref = load_file(minilm_path / "model.safetensors")
    spec = config_spec(minilm_path, ref)
    assert len(spec.groups) == 12 and spec.group("layer5.heads").size == 12 and spec.group("layer0.ffn").size == 1536
    q = random_perms(spec)
    folder = tmp_path / "shuffled"
    folder.mkdir()
    copy_model_files(minilm_path, folder)
    save_file(apply_permutation(spec, ref, q), folder / "model.safetensors")
    res = align(minilm_path, [folder])
    m = res.models[0]
    assert all(torch.equal(q[k][m.perms[k]], torch.arange(len(q[k]))) for k in q)
    assert m.distance_after == 0.0 and m.max_logit_diff < 1e-4
    out = save_aligned(res, tmp_path / "out", sources=[folder], reference=minilm_path)
    assert (out[0] / "config.json").is_file() and (out[0] / "tokenizer.json").is_file()
    back = load_file(out[0] / "model.safetensors")
    assert all(torch.equal(back[k], ref[k]) for k in ref)
