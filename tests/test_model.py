"""network.py specs -> model.py modules: the PyTorch network is the spec, layer by layer (CPU, fast).

tests/test_configs.py checks each row's spec tokens against the authors' networks; here the *modules*
built from a spec are checked against those tokens and the spec's parameter counts, and the graph
families (strided convs, ResNet-32, SqueezeNet with and without SAF-pooling) are checked in detail.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as N
from simpnet_cli.config import tables
from simpnet_cli.errors import UserError

from conftest import resolve_row

ALL_ROWS = [pytest.param(t.name, r["id"], id=f"{t.name}:{r['id']}") for t in tables.load_tables("all") for r in t.rows]
# One or two rows per table and every graph family, for the (slower) forward passes.
FORWARD_ROWS = [("2", "8L"), ("3", "6L"), ("4", "WE13"), ("5", "P3"), ("6", "SN15-strided"), ("6", "RN32-max"),
                ("7", "7x7-300K-v2"), ("8", "2x2-end11"), ("9", "3x3-300K"), ("10", "5x5-end"), ("11", "SQ-SAF"),
                ("11", "SN-SAF"), ("12", "5M-C100"), ("13", "slim-300K"), ("14", "slim-300K"),
                ("14b", "600K-C100")]


def _built(table: str, row_id: str):
    run = resolve_row(table, row_id)
    torch.manual_seed(0)
    return run, M.build_model(run.spec, run.in_shape, run.net)


def _leaf_tokens(model: nn.Module) -> list[str]:
    """The model's layers in forward order, in the spec's token grammar: a conv's suffix says which of BatchNorm
    and ReLU modules follow it (none: -linear), a BatchNorm after anything else is ``bn``/``bn-relu``."""
    out = []
    leaves = [m for m in model.modules() if not list(m.children())]
    for i, m in enumerate(leaves):
        nxt = leaves[i + 1:i + 3]
        if isinstance(m, nn.BatchNorm2d):
            relu = bool(nxt) and isinstance(nxt[0], nn.ReLU)
            if i and isinstance(leaves[i - 1], nn.Conv2d):
                continue  # part of the conv's token
            out.append("bn-relu" if relu else "bn")
        elif isinstance(m, nn.Conv2d):
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            assert m.kernel_size == (k, k) and m.stride == (s, s) and m.padding == (p, p)
            bn = bool(nxt) and isinstance(nxt[0], nn.BatchNorm2d)
            relu = any(isinstance(n, nn.ReLU) for n in (nxt[1:] if bn else nxt[:1]))
            suffix = {(True, True): "", (True, False): "-norelu", (False, True): "-nobn", (False, False): "-linear"}
            out.append(f"conv{m.out_channels}k{k}" + (f"s{s}" if s != 1 else "") + f"p{p}"
                       + (f"g{m.groups}" if m.groups != 1 else "") + suffix[bn, relu])
        elif isinstance(m, nn.MaxPool2d):
            assert m.ceil_mode, "Caffe rounds pooled sizes up"
            out.append(f"pool-MAXk{m.kernel_size}s{m.stride}")
        elif isinstance(m, nn.Dropout):
            out.append(f"drop{m.p:g}")
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            out.append("GP-MAX")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out.append("GP-AVE")
        elif isinstance(m, nn.Linear):
            out.append(f"fc{m.out_features}")
    return out


def _spec_tokens(spec) -> list[str]:
    """The spec's tokens without the graph joins, and with an explicit ``g1`` dropped (a module has groups=1)."""
    return [re.sub(r"g1(?=-|$)", "", t) for t in N.tokens(spec) if t not in ("add", "concat")]


def _conv_records(spec) -> list[N.Conv]:
    out = []
    for rec in spec:
        if isinstance(rec, N.Conv):
            out.append(rec)
        elif isinstance(rec, N.Residual):
            out += _conv_records(rec.main) + _conv_records(rec.shortcut)
        elif isinstance(rec, N.Fire):
            out += [rec.squeeze, rec.expand1, rec.expand3]
    return out


def _conv_and_linear_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())


def _input(run, n: int = 2) -> torch.Tensor:
    return torch.randn(n, run.in_shape.c, run.in_shape.h, run.in_shape.w, generator=torch.Generator().manual_seed(1))


def _shape_before_global_pool(model: nn.Module, x: torch.Tensor) -> tuple:
    seen = []
    pools = [m for m in model.modules() if isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d))]
    assert len(pools) == 1
    handle = pools[0].register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- every row

@pytest.mark.parametrize("table,row_id", ALL_ROWS)
def test_module_params_equal_spec_counts(table, row_id):
    run, model = _built(table, row_id)
    paper, total = N.count_params(run.spec, run.in_shape)
    assert M.count_trainable(model) == total
    assert _conv_and_linear_params(model) == paper


@pytest.mark.parametrize("table,row_id", ALL_ROWS)
def test_modules_follow_the_spec_layer_by_layer(table, row_id):
    run, model = _built(table, row_id)
    assert _leaf_tokens(model) == _spec_tokens(run.spec)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    records = _conv_records(run.spec)
    assert len(convs) == len(records)
    for i, (conv, rec) in enumerate(zip(convs, records), 1):
        got = (conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.groups)
        assert got == (rec.out, (rec.k, rec.k), (rec.s, rec.s), (rec.p, rec.p), rec.g or 1), f"conv {i}"


def _assert_filled(w: torch.Tensor, filler: str, std: float | None = None) -> None:
    """Caffe's fillers: xavier = uniform(+-sqrt(3/fan_in)), msra = normal(0, sqrt(2/fan_in)), gaussian = normal(0, std)."""
    fan_in = w[0].numel()
    w = w.detach()
    if filler == "xavier":
        bound = math.sqrt(3.0 / fan_in)
        assert w.abs().max().item() <= bound + 1e-7
        if w.numel() >= 200:  # uniform over the whole range, not a narrower filler
            assert w.abs().max().item() > 0.8 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    elif w.numel() >= 200:
        want = math.sqrt(2.0 / fan_in) if filler == "msra" else std
        assert w.std().item() == pytest.approx(want, rel=0.2)
        assert w.abs().max().item() > 2 * want  # a normal's tails, not a uniform's edge


@pytest.mark.parametrize("table,row_id", ALL_ROWS)
def test_init_follows_the_recipe(table, row_id):
    """Every conv is drawn from the row's filler (its convs in init.on_convs from normal(0, gaussian_std)), the fc
    from the classifier's filler; every bias starts at 0."""
    run, model = _built(table, row_id)
    init = run.recipe()["init"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.caffe_conv_index for c in convs] == list(range(1, len(convs) + 1))
    for i, conv in enumerate(convs, 1):
        if i in init["on_convs"]:
            _assert_filled(conv.weight, "gaussian", init["gaussian_std"])
        else:
            _assert_filled(conv.weight, init["default"])
        assert torch.count_nonzero(conv.bias) == 0
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(fcs) == (init["classifier"] is not None)
    for fc in fcs:
        assert fc.caffe_classifier
        _assert_filled(fc.weight, init["classifier"])
        assert torch.count_nonzero(fc.bias) == 0


def test_a_conv_in_on_convs_starts_with_std_0_01():
    run, model = _built("4", "BW10")
    assert run.recipe()["init"]["on_convs"] == [3, 4, 5]
    convs = {c.caffe_conv_index: c.weight for c in model.modules() if isinstance(c, nn.Conv2d)}
    for i in (3, 4, 5):
        assert convs[i].std().item() == pytest.approx(0.01, rel=0.02)
    for i in (2, 6):  # xavier elsewhere: std sqrt(1/fan_in), 0.029 and 0.019 here, not 0.01
        assert convs[i].std().item() == pytest.approx(math.sqrt(1 / convs[i][0].numel()), rel=0.05)


@pytest.mark.parametrize("table,row_id,fraction", [("2", "8L", 0.99), ("4", "WE10", 0.95), ("6", "RN32-max", 0.999)])
def test_batchnorm_keeps_the_rows_moving_average_fraction(table, row_id, fraction):
    _, model = _built(table, row_id)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == pytest.approx(1 - fraction) for bn in bns)


@pytest.mark.parametrize("table,row_id", FORWARD_ROWS)
def test_forward_batch_of_two(table, row_id):
    run, model = _built(table, row_id)
    model.eval()
    with torch.no_grad():
        out = model(_input(run))
    assert out.shape == (2, run.dataset["classes"])
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- strided convolution (Table 6)

def _stage_entry_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """The output shape of every top-level layer that changes the spatial size (a new stage), and the shape
    that reaches global pooling."""
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape))) for m in model]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    entries = [s for prev, s in zip([tuple(x.shape)] + shapes, shapes) if len(s) == 4 and s[2:] != prev[2:]]
    return entries + [_shape_before_global_pool(model, x)]


def test_strided_conv_replaces_pooling_shape_for_shape():
    max_run, max_model = _built("6", "SN15-max")
    str_run, str_model = _built("6", "SN15-strided")
    x = _input(max_run)
    max_stages = _stage_entry_shapes(max_model, x)
    assert max_stages == _stage_entry_shapes(str_model, x)
    assert max_stages == [(2, 50, 16, 16), (2, 58, 8, 8), (2, 90, 8, 8)]
    # Same conv weights; the two strided convs lose only their BatchNorm (scale + shift).
    max_paper, max_total = N.count_params(max_run.spec, max_run.in_shape)
    str_paper, str_total = N.count_params(str_run.spec, str_run.in_shape)
    assert str_paper == max_paper
    assert str_total == max_total  # both rows' two downsampling convs are linear (no BatchNorm)
    assert _conv_and_linear_params(str_model) == _conv_and_linear_params(max_model)
    assert not any(isinstance(m, nn.MaxPool2d) for m in str_model.modules())


def test_strided_conv_has_no_batchnorm_or_relu():
    run, model = _built("6", "SN15-strided")
    assert run.net["strided_bn_relu"] is False
    strided = [r for r in run.spec if isinstance(r, N.Conv) and r.s == 2]
    assert len(strided) == 2 and all(r.act == "none" for r in strided)
    layers = list(model)
    for i, layer in enumerate(layers):
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        if convs and convs[0].stride == (2, 2):
            assert isinstance(layer, nn.Conv2d), f"layer {i}: strided conv wrapped with {layer}"
            nxt = layers[i + 1]
            assert not isinstance(nxt, (nn.BatchNorm2d, nn.ReLU))
        elif convs:  # every other conv keeps BatchNorm + ReLU
            kinds = [type(m) for m in layer]
            assert kinds == [nn.Conv2d, M.CaffeBatchNorm2d, nn.ReLU], f"layer {i}: {kinds}"


def test_strided_conv_with_bn_relu_when_asked():
    run = resolve_row("6", "SN15-strided")
    spec = N.build_spec({**run.net, "strided_bn_relu": True}, 100)
    assert [r.act for r in spec if isinstance(r, N.Conv) and r.s == 2] == ["bn_relu", "bn_relu"]
    assert N.count_params(spec, run.in_shape)[1] == N.count_params(resolve_row("6", "SN15-max").spec,
                                                                    run.in_shape)[1] + 2 * (50 + 58)


def test_the_conv_before_each_pool_of_sn15_max_is_linear():
    """Table 6 SN15-max: the conv right before each max pool has no BatchNorm and no ReLU after it."""
    _, model = _built("6", "SN15-max")
    layers = list(model)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2
    for i in pools:
        assert isinstance(layers[i - 1], nn.Conv2d), f"layer {i - 1} before the pool: {layers[i - 1]}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled_input = model[:pools[0]].eval()(x)
    assert (pooled_input < 0).any()  # no ReLU: the map reaching the pool keeps negative values


@pytest.mark.parametrize("table,row_id,conv", [("3", "10L", 7), ("4", "WE10", 7), ("10", "5x5-start", 7)])
def test_pool_before_batchnorm(table, row_id, conv):
    """conv -> max pool -> BatchNorm -> ReLU: the conv's own BatchNorm and ReLU follow its pool."""
    _, model = _built(table, row_id)
    layers = list(model)
    at = next(i for i, m in enumerate(layers) if getattr(m, "caffe_conv_index", None) == conv)
    assert isinstance(layers[at + 1], nn.MaxPool2d)
    assert [type(m) for m in layers[at + 2]] == [M.CaffeBatchNorm2d, nn.ReLU]


def test_table10_convs_11_to_13_have_relu_but_no_batchnorm():
    _, model = _built("10", "5x5-end")
    for layer in model:
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        if convs and convs[0].caffe_conv_index in (11, 12, 13):
            assert [type(m) for m in layer] == [nn.Conv2d, nn.ReLU]


# --------------------------------------------------------------------------- ResNet-32 (Table 6)

@pytest.mark.parametrize("row_id", ["RN32-max", "RN32-strided"])
def test_resnet32(row_id):
    run, model = _built("6", row_id)
    assert N.count_params(run.spec, run.in_shape)[0] == 473_354
    assert _conv_and_linear_params(model) == 473_354
    blocks = [m for m in model.modules() if isinstance(m, M.ResidualBlock)]
    assert len(blocks) == 15
    projection = [c for b in blocks for c in b.shortcut.modules() if isinstance(c, nn.Conv2d)]
    all_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(projection) == 2
    assert len(all_convs) - len(projection) == 31
    assert [c.kernel_size for c in projection] == [(2, 2), (2, 2)]
    assert sum(isinstance(b.shortcut, nn.Identity) for b in blocks) == 13
    x = _input(run)
    assert _shape_before_global_pool(model, x) == (2, 64, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_resnet_shortcut_projections_match_the_authors():
    """max_pool: stage 2 projects with a 2x2 conv then a pool, stage 3 with a stride-2 2x2 conv;
    strided_conv: both projections are stride-2 2x2 convs."""
    def shortcuts(row_id):
        return [N.tokens(r.shortcut) for r in resolve_row("6", row_id).spec if isinstance(r, N.Residual) and r.shortcut]
    assert shortcuts("RN32-max") == [["conv32k2p0-linear", "pool-MAXk2s2", "bn"], ["conv64k2s2p0-norelu"]]
    assert shortcuts("RN32-strided") == [["conv32k2s2p0-norelu"], ["conv64k2s2p0-norelu"]]


@pytest.mark.parametrize("row_id", ["RN32-max", "RN32-strided"])
def test_a_resnet_block_output_can_be_negative(row_id):
    """The authors sum branch and shortcut and apply no ReLU to the sum: a block's output has negative values."""
    run, model = _built("6", row_id)
    outputs = []
    blocks = [m for m in model.modules() if isinstance(m, M.ResidualBlock)]
    hooks = [b.register_forward_hook(lambda mod, inp, out: outputs.append(out)) for b in blocks]
    with torch.no_grad():
        model.eval()(_input(run))
    for h in hooks:
        h.remove()
    assert len(outputs) == 15
    assert all((out < 0).any() for out in outputs)


# --------------------------------------------------------------------------- SqueezeNet and SAF-pooling (Table 11)

@pytest.mark.parametrize("row_id", ["SQ-SAF", "SQ"])
def test_squeezenet(row_id):
    run, model = _built("11", row_id)
    assert N.count_params(run.spec, run.in_shape)[0] == 727_626
    assert _conv_and_linear_params(model) == 727_626
    # The authors' SqueezeNet has no BatchNorm at all: every conv is followed by a ReLU alone.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert M.count_trainable(model) == 727_626
    assert sum(isinstance(m, M.FireModule) for m in model.modules()) == 8
    with torch.no_grad():
        assert model.eval()(_input(run)).shape == (2, 10)


def test_saf_pooling_puts_dropout_after_every_pool():
    run, model = _built("11", "SQ-SAF")
    spec = list(run.spec)
    pools = [i for i, r in enumerate(spec) if isinstance(r, N.Pool)]
    assert len(pools) == 3
    for i in pools:
        assert spec[i + 1] == N.Dropout(0.1), f"spec record after pool {i}: {spec[i + 1]}"
    layers = list(model)
    pool_layers = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    assert len(pool_layers) == 3
    for i in pool_layers:
        assert isinstance(layers[i + 1], nn.Dropout) and layers[i + 1].p == 0.1


def test_no_saf_pooling_means_no_dropout_after_pools():
    run, model = _built("11", "SQ")
    spec = list(run.spec)
    assert not [i for i, r in enumerate(spec) if isinstance(r, N.Pool) and isinstance(spec[i + 1], N.Dropout)]
    layers = list(model)
    assert not [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d) and isinstance(layers[i + 1], nn.Dropout)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5]  # only the head's


def test_simpnet_saf_pooling_rates():
    spec = list(resolve_row("11", "SN-SAF").spec)
    after_pools = [spec[i + 1] for i, r in enumerate(spec) if isinstance(r, N.Pool)]
    assert after_pools == [N.Dropout(0.1), N.Dropout(0.2)]
    spec = list(resolve_row("11", "SN").spec)
    assert not any(isinstance(r, N.Dropout) for r in spec)


# --------------------------------------------------------------------------- impossible networks

def _raises_network_error(spec, shape, *words):
    with pytest.raises(N.NetworkError) as info:
        N.check(spec, shape)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    with pytest.raises(N.NetworkError):
        M.build_model(spec, shape)
    with pytest.raises(N.NetworkError):
        N.count_params(spec, shape)


def test_kernel_larger_than_map():
    spec = (N.Conv(8, 7, 1, 0), N.GlobalPool("max"), N.Linear(10))
    _raises_network_error(spec, N.Shape(3, 4, 4), "layer 1", "7x7", "4x4")
    # The same kernel fits once padded enough, or on a larger map.
    assert N.check((N.Conv(8, 7, 1, 2), N.GlobalPool("max"), N.Linear(10)), N.Shape(3, 4, 4)) == N.Shape(10, 1, 1)
    assert N.check(spec, N.Shape(3, 7, 7)) == N.Shape(10, 1, 1)


def test_kernel_larger_than_map_in_a_plain_network():
    arch = {"builder": "plain", "widths": "C8{4}", "pools_after": [1, 2, 3], "kernels": {"4": 7}, "paddings": {"4": 0}}
    _raises_network_error(N.build_spec(arch, 10), N.Shape(3, 32, 32), "layer 7", "7x7", "4x4")


def test_pooling_past_one_pixel_on_mnist():
    """Caffe rounds pooled sizes up: 28 -> 14 -> 7 -> 4 -> 2 -> 1, so five 2x2 pools still leave a 1x1 map;
    a sixth would pool past it."""
    mnist = N.Shape(1, 28, 28)
    five = N.build_spec({"builder": "plain", "widths": "C8{5}", "pools_after": [1, 2, 3, 4, 5]}, 10)
    assert N.check(five[:-2], mnist) == N.Shape(8, 1, 1)
    six = N.build_spec({"builder": "plain", "widths": "C8{6}", "pools_after": [1, 2, 3, 4, 5, 6]}, 10)
    _raises_network_error(six, mnist, "pool", "1x1")
    # Five pools of a map that starts at 16 (floor rounding would already fail at 4 pools on 28).
    _raises_network_error(five, N.Shape(1, 16, 16), "pool", "1x1")


def test_groups_must_divide_channels():
    arch = {"builder": "plain", "widths": "C16, C16", "pools_after": [], "groups": {"2": 3}}
    _raises_network_error(N.build_spec(arch, 10), N.Shape(3, 32, 32), "layer 2", "3 groups")
    # Input channels that do not split: 3 RGB maps into 2 groups.
    _raises_network_error((N.Conv(8, 3, 1, 1, 2),), N.Shape(3, 32, 32), "layer 1", "2 groups")
    ok = N.build_spec({**arch, "groups": {"2": 4}}, 10)
    model = M.build_model(ok, N.Shape(3, 32, 32))
    assert [m.groups for m in model.modules() if isinstance(m, nn.Conv2d)] == [1, 4]
    assert M.count_trainable(model) == N.count_params(ok, N.Shape(3, 32, 32))[1]


def test_a_row_with_an_impossible_network_fails_to_resolve():
    t = tables.load_table("5")
    row = {**t.row("P5"), "dataset": "mnist", "net": {"widths": "C8{6}", "pools_after": [1, 2, 3, 4, 5, 6]}}
    with pytest.raises(N.NetworkError) as info:
        tables.resolve(t, row, 0, {})
    assert "table 5, row P5" in str(info.value)


# --------------------------------------------------------------------------- Caffe-style BatchNorm

def test_caffe_batchnorm_uses_debiased_moving_averages():
    """After 5 training batches of data with mean 5 and std 2, Caffe's normalised moving averages are the
    true statistics; PyTorch's plain running estimate (momentum 0.01) would still be near 0 and 1."""
    torch.manual_seed(0)
    caffe, plain = M.CaffeBatchNorm2d(4), nn.BatchNorm2d(4, eps=1e-5, momentum=0.01)
    caffe.train(), plain.train()
    for _ in range(5):
        x = 5 + 2 * torch.randn(64, 4, 8, 8)
        caffe(x), plain(x)
    caffe.eval(), plain.eval()
    x = 5 + 2 * torch.randn(256, 4, 8, 8)
    with torch.no_grad():
        y_caffe, y_plain = caffe(x), plain(x)
    assert y_caffe.mean().item() == pytest.approx(0.0, abs=0.05)
    assert y_caffe.std().item() == pytest.approx(1.0, abs=0.05)
    assert y_plain.mean().item() > 4.0  # x - ~0.25, barely normalised
    # Caffe's figures directly: the moving averages divided by the weight they have accumulated.
    decay = 0.99 ** 5
    assert (caffe.running_mean / (1 - decay)).tolist() == pytest.approx([5.0] * 4, abs=0.1)
    assert ((caffe.running_var - decay) / (1 - decay)).tolist() == pytest.approx([4.0] * 4, abs=0.2)
    assert plain.running_mean.max().item() < 0.5


def test_caffe_batchnorm_in_training_mode_is_batchnorm():
    torch.manual_seed(0)
    caffe, plain = M.CaffeBatchNorm2d(3), nn.BatchNorm2d(3, eps=1e-5, momentum=0.01)
    x = 3 + torch.randn(16, 3, 5, 5)
    torch.testing.assert_close(caffe.train()(x), plain.train()(x))
    assert caffe.momentum == pytest.approx(0.01) and caffe.eps == 1e-5
