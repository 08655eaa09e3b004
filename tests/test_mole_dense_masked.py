"""MoLE's dense-masked kernel (every expert in one GEMM per LoRA side, masked by the routing gates, in
token order) against the segment kernel (tokens sorted by expert) and a plain reference: outputs and
every gradient, the same dropout lanes, bf16, experts no token chose, a frozen base."""

import pytest
import torch
import torch.nn.functional as F

from movekd.mole import MoLEFFN, inject_mole, kernels, mole_layers
from test_mole import _one_thread, grads, layer, reference_ffn, tiny  # noqa: F401 (autouse fixture)

KERNELS = ("segments", "dense_masked")


def _run(m: MoLEFFN, kernel: str, x: torch.Tensor, params: list[torch.Tensor], autocast: bool = False):
    """Output and gradients (of ``x`` and ``params``, zeros where None) of one forward on ``kernel``."""
    m.grouped_kernel = kernel
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(x)
    return out, grads(out.float(), [x] + params)


def _same_with_same_lanes(m: MoLEFFN, x: torch.Tensor, params: list[torch.Tensor], monkeypatch) -> torch.Tensor:
    """Both kernels on the same dropout lanes give the same output and gradients; returns the output."""
    results = {}
    for kernel in KERNELS:
        _lanes_by_token(m, x, monkeypatch, kernel)
        results[kernel] = _run(m, kernel, x, params)
    (out_s, grads_s), (out_d, grads_d) = results["segments"], results["dense_masked"]
    torch.testing.assert_close(out_d, out_s, rtol=0, atol=1e-5)
    for g, w in zip(grads_d, grads_s):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    return out_d


def _lanes_by_token(m: MoLEFFN, x: torch.Tensor, monkeypatch, kernel: str, seed: int = 3) -> None:
    """Make both kernels drop the same (token, feature) entries: lanes drawn once per linear in token
    order, handed to the dense-masked kernel as they are and to the segment kernel in its sorted
    row order."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    lanes = [torch.randint(-32768, 32768, (x2.shape[0], n), generator=generator, dtype=torch.int32).to(torch.int16)
             for n in (m.fc1.in_features, m.fc2.in_features)]
    if kernel == "segments":
        with torch.no_grad():
            expert = F.linear(x2, m.router.weight, m.router.bias).argmax(-1)
        order = torch.argsort(expert, stable=True)
        lanes = [t[order] for t in lanes]
    calls = iter(lanes)
    monkeypatch.setattr(kernels, "dropout_mask", lambda shape, p, device: kernels.StoredDropoutMask(next(calls), p))


def _close(got: list[torch.Tensor], want: list[torch.Tensor], rel: float) -> None:
    """Each tensor within ``rel`` of the other's scale (max abs difference / max abs value)."""
    for a, b in zip(got, want):
        scale = b.float().abs().max().clamp_min(1e-12)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("routing", ["sparse", "gated"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_segments_and_reference(routing, mode):
    m = layer(routing).train(mode == "train")
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = list(m.parameters())
    ref = reference_ffn(m, x)
    want = grads(ref, [x] + params)
    for kernel in KERNELS:
        out, got = _run(m, kernel, x, params)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["sparse", "gated"])
def test_same_dropout_lanes_same_numbers(routing, monkeypatch):
    m = layer(routing, dropout=0.3).train()
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = list(m.parameters())
    out_d = _same_with_same_lanes(m, x, params, monkeypatch)
    with torch.no_grad():  # and dropout did act
        assert (out_d - reference_ffn(m, x)).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["sparse", "gated"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_autocast_matches_segments(routing, dropout, monkeypatch):
    m = layer(routing, dropout=dropout).train()
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = list(m.parameters())
    results = {}
    for kernel in KERNELS:
        if dropout:
            _lanes_by_token(m, x, monkeypatch, kernel)
        results[kernel] = _run(m, kernel, x, params, autocast=True)
    (out_s, grads_s), (out_d, grads_d) = results["segments"], results["dense_masked"]
    assert out_d.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads_d[1:])  # cast back to the float32 parameters
    # bf16 rounding of differently blocked GEMMs: relative to each tensor's scale
    _close([out_d], [out_s], 2e-2)
    _close(grads_d, grads_s, 3e-2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("routing", ["sparse", "gated"])
def test_unrouted_expert_keeps_no_gradient(kernel, routing):
    m = layer(routing).train()
    with torch.no_grad():
        m.router.bias[2] = -1e4  # no token picks expert 2
    m.grouped_kernel = kernel
    x = torch.randn(2, 65, 32, requires_grad=True)
    out = m(x)
    assert m.experts_routed == [True, True, False]
    ref = reference_ffn(m, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    (out * torch.randn(out.shape)).sum().backward()
    for name, p in m.named_parameters():
        if routing == "sparse" and name.startswith("router."):
            continue  # sparse: the task loss gives the router no gradient (the balance loss does)
        unrouted = name.startswith(("moe_down.2.", "moe_up.2."))
        assert (p.grad is None) == unrouted, name


@pytest.mark.parametrize("routing", ["sparse", "gated"])
def test_frozen_base(routing, monkeypatch):
    m = layer(routing, dropout=0.2).train()
    m.fc1.requires_grad_(False)
    m.fc2.requires_grad_(False)
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    _same_with_same_lanes(m, x, params, monkeypatch)
    monkeypatch.undo()
    m.grouped_kernel = "dense_masked"
    m(x).sum().backward()
    assert m.fc1.weight.grad is None and m.fc2.bias.grad is None
    assert m.moe_up[0].lora_A.weight.grad is not None


def test_backward_twice_with_a_retained_graph():
    """The backward reuses the recomputed dropout mask in place: a second backward must see it intact."""
    m = layer("gated", dropout=0.3, grouped_kernel="dense_masked").train()
    x = torch.randn(2, 65, 32, requires_grad=True)
    out = m(x)
    g = torch.randn(out.shape)
    first = torch.autograd.grad(out, [x, m.moe_up[1].lora_A.weight, m.fc2.weight], g, retain_graph=True)
    second = torch.autograd.grad(out, [x, m.moe_up[1].lora_A.weight, m.fc2.weight], g)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True], ids=["sparse", "gated"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_kernel_matches_reference_with_the_same_mask(monkeypatch, gated, with_bias):
    torch.manual_seed(0)
    rows, d_in, d_out, rank, num = 10, 16, 12, 4, 3
    z = torch.randn(rows, d_in, requires_grad=True)
    weight = torch.randn(d_out, d_in, requires_grad=True)
    bias = torch.randn(d_out, requires_grad=True) if with_bias else None
    expert = torch.tensor([0, 2, 1, 0, 0, 2, 1, 1, 2, 0])
    onehot = F.one_hot(expert, num).float()
    gate = torch.rand(rows, 1, requires_grad=True) if gated else None
    a_w = [torch.randn(rank, d_in, requires_grad=True) for _ in range(num)]
    a_b = [torch.randn(rank, requires_grad=True) for _ in range(num)]
    b_w = [torch.randn(d_out, rank, requires_grad=True) for _ in range(num)]
    b_b = [torch.randn(d_out, requires_grad=True) for _ in range(num)]
    mask = torch.rand(rows, d_in) < 0.3  # dropped entries
    lanes = torch.where(mask, -32768, 32767).to(torch.int16)  # what the kernel turns into that mask
    monkeypatch.setattr(kernels, "dropout_mask", lambda shape, p, device: kernels.StoredDropoutMask(lanes, p))
    s = 0.25
    gates = onehot * gate if gated else onehot
    out = kernels.mole_linear_masked(z, gates, 0.3, s, weight, bias, a_w, a_b, b_w, b_b)
    dropped = z.masked_fill(mask, 0) / 0.7
    gates = onehot * gate if gated else onehot  # a graph of its own for the reference
    lora = sum(gates[:, e:e + 1] * s * F.linear(F.linear(dropped, a_w[e], a_b[e]), b_w[e], b_b[e])
               for e in range(num))
    ref = F.linear(z, weight, bias) + lora
    torch.testing.assert_close(out, ref)
    inputs = [z, weight, *a_w, *a_b, *b_w, *b_b] + ([bias] if with_bias else []) + ([gate] if gated else [])
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want)


def test_grouped_kernel_option():
    model = inject_mole(tiny("clip"), rank=4, grouped_kernel="dense_masked")
    assert [m.grouped_kernel for m in mole_layers(model)] == ["dense_masked"] * 2
    assert mole_layers(inject_mole(tiny("clip"), rank=4))[0].grouped_kernel == "segments"
    with pytest.raises(ValueError, match="grouped_kernel"):
        inject_mole(tiny("clip"), grouped_kernel="dense")
