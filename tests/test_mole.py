"""MoLE: injection into HF CLIP / DINOv2 and timm ViT, routing semantics, fast paths vs a reference."""

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

from movekd.functional import balance_loss
from movekd.mole import (
    MoLEFFN,
    collect_router_probs,
    inject_mole,
    mole_layers,
    mole_parameters,
    record_router_probs,
)
from movekd.mole import kernels

ROUTINGS = ["sparse", "gated", "dense", "topk"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from threads, and on a shared 2-core machine every parallel region
    # waits for a descheduled peer (seconds per test instead of milliseconds).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(family: str) -> torch.nn.Module:
    """2-block ViTs, width 32, 65 tokens (8x8 patches + CLS)."""
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=32, patch_size=4))
    if family == "dinov2":
        return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                        image_size=32, patch_size=4))
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=0)


def run(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final hidden states of any of the three families."""
    if isinstance(model, VisionTransformer):
        return model.forward_features(images)
    return model(pixel_values=images).last_hidden_state


def reference_ffn(m: MoLEFFN, x: torch.Tensor) -> torch.Tensor:
    """Straightforward MoLE FFN: every expert on every token, combined with the routing gates."""
    x2 = x.reshape(-1, x.shape[-1])
    p = torch.softmax(F.linear(x2, m.router.weight, m.router.bias).float(), -1)
    top1 = F.one_hot(p.argmax(-1), m.num_experts).float()
    if m.routing == "sparse":
        gates = top1
    elif m.routing == "gated":
        gates = top1 * p
    elif m.routing == "dense":
        gates = p
    else:
        val, idx = p.topk(m.top_k, -1)
        gates = torch.zeros_like(p).scatter(-1, idx, val / val.sum(-1, keepdim=True))

    def lora(expert, z):
        return m.scaling * F.linear(F.linear(z, expert.lora_A.weight, expert.lora_A.bias),
                                    expert.lora_B.weight, expert.lora_B.bias)

    h = F.linear(x2, m.fc1.weight, m.fc1.bias) + sum(gates[:, e:e + 1] * lora(m.moe_down[e], x2)
                                                     for e in range(m.num_experts))
    for name in m._mid_names:
        h = getattr(m, name)(h)
    y = F.linear(h, m.fc2.weight, m.fc2.bias) + sum(gates[:, e:e + 1] * lora(m.moe_up[e], h)
                                                    for e in range(m.num_experts))
    return y.view(*x.shape[:-1], -1)


def layer(routing: str = "sparse", dropout: float = 0.0, **kw) -> MoLEFFN:
    torch.manual_seed(0)
    model = inject_mole(tiny("clip"), rank=4, routing=routing, dropout=dropout, **kw)
    return mole_layers(model)[0]


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    found = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]


# ---------------------------------------------------------------- structure and sizes
def test_clip_large_param_count_and_names():
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=336, patch_size=14))
    base_keys = set(model.state_dict())
    before = sum(p.numel() for p in model.parameters())
    inject_mole(model)
    assert sum(p.numel() for p in model.parameters()) - before == 24_040_008
    layer0 = mole_layers(model)[0]
    assert sum(p.numel() for p in layer0.moe_down[0].parameters()) == 167_968
    assert sum(p.numel() for p in layer0.moe_up[0].parameters()) == 164_896
    assert sum(p.numel() for p in layer0.router.parameters()) == 3_075
    assert len(mole_layers(model)) == 24
    keys = set(model.state_dict())
    assert base_keys <= keys  # base weights keep their names (encoder.layers.{i}.mlp.fc1.weight, ...)
    new = keys - base_keys
    assert all(any(s in k for s in ("router", "moe_down", "moe_up")) for k in new)
    assert {n for n, _ in mole_parameters(model)} == new
    assert "encoder.layers.3.mlp.moe_up.2.lora_B.bias" in new
    out = model(pixel_values=torch.empty(1, 3, 336, 336, device="meta")).last_hidden_state  # shape probing
    assert out.shape == (1, 577, 1024)


@pytest.mark.parametrize("family", ["clip", "dinov2", "timm"])
def test_zero_b_keeps_outputs_and_paper_init_changes_them(family):
    torch.manual_seed(0)
    base = tiny(family).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = run(base, images)
        zero_b = inject_mole(copy.deepcopy(base), rank=4, init="zero_b").eval()
        paper = inject_mole(copy.deepcopy(base), rank=4, init="paper").eval()
        assert len(mole_layers(zero_b)) == 2
        torch.testing.assert_close(run(zero_b, images), expected, rtol=0, atol=1e-6)
        assert (run(paper, images) - expected).abs().max() > 1e-3
    lora = mole_layers(paper)[0].moe_down[0]
    bound = (6 / lora.lora_B.in_features) ** 0.5  # kaiming-uniform (relu gain) on B, as official
    assert 0.5 * bound < lora.lora_B.weight.abs().max() <= bound
    assert lora.lora_B.bias.abs().sum() == 0 and lora.lora_A.bias.abs().sum() == 0


def test_unsupported_ffns_raise_clear_errors():
    swiglu = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                      patch_size=4, use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="gated FFN"):
        inject_mole(swiglu)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4, mlp_layer=SwiGLUPacked,
                            act_layer=torch.nn.SiLU, num_classes=0)
    with pytest.raises(ValueError, match="gated FFN"):
        inject_mole(vit)
    with pytest.raises(ValueError, match="no supported FFN"):
        inject_mole(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = inject_mole(tiny("clip"))
    with pytest.raises(ValueError, match="already"):
        inject_mole(model)
    with pytest.raises(ValueError, match="routing"):
        inject_mole(tiny("clip"), routing="top1")


def test_module_filter_selects_layers():
    model = inject_mole(tiny("clip"), module_filter=lambda path: path.startswith("encoder.layers.0."))
    assert len(mole_layers(model)) == 1 and isinstance(model.encoder.layers[0].mlp, MoLEFFN)


# ---------------------------------------------------------------- gradients and routing semantics
@pytest.mark.parametrize("routing", ROUTINGS)
def test_router_gradient_by_mode(routing):
    torch.manual_seed(0)
    model = inject_mole(tiny("clip"), rank=4, routing=routing).train()
    images = torch.randn(2, 3, 32, 32)
    routers = [m.router.weight for m in mole_layers(model)]
    task = grads(run(model, images), routers)
    if routing == "sparse":
        assert all(g.abs().sum() == 0 for g in task)  # Eq. 1 as released: argmax only, no gate
    else:
        assert all(g.abs().sum() > 0 for g in task)
    run(model, images)
    balance = torch.autograd.grad(balance_loss(collect_router_probs(model)), routers)
    assert all(g.abs().sum() > 0 for g in balance)


@pytest.mark.parametrize("family", ["clip", "dinov2", "timm"])
def test_every_trainable_parameter_gets_a_gradient(family):
    torch.manual_seed(0)
    model = inject_mole(tiny(family), rank=4, routing="gated").train()
    images = torch.randn(4, 3, 32, 32)
    if isinstance(model, VisionTransformer):
        out = model.forward_features(images)
    else:
        output = model(pixel_values=images)
        out = torch.cat([output.last_hidden_state.flatten(1), output.pooler_output], 1)
    loss = (out * torch.randn(out.shape)).sum() + balance_loss(collect_router_probs(model))
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # DINOv2's mask token is only used with bool_masked_pos
    assert missing in ([], ["embeddings.mask_token"])


# ---------------------------------------------------------------- fast paths == reference
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_path_matches_reference(routing, mode):
    m = layer(routing).train(mode == "train")
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = [p for p in m.parameters()]
    out = m(x)
    ref = reference_ffn(m, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip(grads(out, [x] + params), grads(ref, [x] + params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "segmented"])
def test_folded_inference_matches_and_tracks_weight_changes(packed, monkeypatch):
    from movekd.mole import kernels, layer as layer_module

    if packed and not kernels.packed_linear_supported(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN weight packing not available in this torch build")
    if not packed:  # the portable path (GPUs, builds without oneDNN)
        monkeypatch.setattr(layer_module, "packed_linear_supported", lambda device, dtype: False)
    m = layer("sparse", fold_inference=True).eval()
    x = torch.randn(3, 65, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)
        assert m._fold_cache is not None and m._fold_cache[4] is packed
        for p in m.parameters():  # an optimizer step in place
            p.add_(0.05 * torch.randn_like(p))
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)
        other = {k: v + 0.05 * torch.randn_like(v) for k, v in m.state_dict().items()}
        m.load_state_dict(other)
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)
        m.moe_up[1].lora_B.weight.data = torch.randn_like(m.moe_up[1].lora_B.weight)  # new storage
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(x)
        assert half.dtype == torch.bfloat16 and m._fold_cache[1].dtype == torch.bfloat16
        ref = reference_ffn(m, x)
        assert (half.float() - ref).abs().mean() < 0.02 * ref.abs().mean()
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)  # back to float32: cache rebuilt
    m.train()
    assert m._fold_cache is None  # dropped on train()


def test_grouped_path_after_weight_change():
    m = layer("gated").eval()
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        m(x)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)


def test_whole_model_matches_reference_layers(monkeypatch):
    torch.manual_seed(0)
    model = inject_mole(tiny("timm"), rank=4, dropout=0.0).train()
    images = torch.randn(2, 3, 32, 32)
    fast = run(model, images)
    monkeypatch.setattr(MoLEFFN, "forward", reference_ffn)
    torch.testing.assert_close(fast, run(model, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["sparse", "gated"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_fused_linear_kernel_matches_reference_with_the_same_mask(monkeypatch, gated, with_bias):
    torch.manual_seed(0)
    z = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(12, 16, requires_grad=True)
    bias = torch.randn(12, requires_grad=True) if with_bias else None
    gate = torch.rand(10, 1, requires_grad=True) if gated else None
    a_w = [torch.randn(4, 16, requires_grad=True) for _ in range(2)]
    a_b = [torch.randn(4, requires_grad=True) for _ in range(2)]
    b_w = [torch.randn(12, 4, requires_grad=True) for _ in range(2)]
    b_b = [torch.randn(12, requires_grad=True) for _ in range(2)]
    mask = torch.rand(10, 16) < 0.3  # dropped entries
    lanes = torch.where(mask, -32768, 32767).to(torch.int16)  # what the kernel turns into that mask
    monkeypatch.setattr(kernels, "dropout_mask", lambda shape, p, device: kernels.StoredDropoutMask(lanes, p))
    counts, s = [6, 4], 0.25
    out = kernels.mole_linear(z, counts, 0.3, s, weight, bias, gate, a_w, a_b, b_w, b_b)
    dropped = z.masked_fill(mask, 0) / 0.7
    rows = [slice(0, 6), slice(6, 10)]
    lora = torch.cat([s * F.linear(F.linear(dropped[r], a_w[e], a_b[e]), b_w[e], b_b[e]) for e, r in enumerate(rows)])
    ref = F.linear(z, weight, bias) + (lora * gate if gated else lora)
    torch.testing.assert_close(out, ref)
    inputs = [z, weight, *a_w, *a_b, *b_w, *b_b] + ([bias] if with_bias else []) + ([gate] if gated else [])
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want)


def test_bucket_rows_ladder():
    sizes = set()
    for n in range(1, 5001):
        size = kernels.bucket_rows(n)
        sizes.add(size)
        assert n <= size and (size % 8 == 0 and size - n < 8 if n <= 64 else size - n <= n / 8), n
    assert len(sizes) <= 60  # a few dozen GEMM shapes for any segment length up to 5,000 rows


def _mole_linear_run(counts, gated, p, dtype=torch.float64):
    """Output and every gradient of one ``mole_linear`` call on fixed random tensors (dropout seeded)."""
    torch.manual_seed(1)
    rows, d_in, d_out, rank = sum(counts), 24, 40, 4
    z = torch.randn(rows, d_in, dtype=dtype, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=dtype, requires_grad=True)
    bias = torch.randn(d_out, dtype=dtype, requires_grad=True)
    gate = torch.rand(rows, 1, dtype=dtype, requires_grad=True) if gated else None

    def per_expert(*shape):
        return [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in counts]

    a_w, a_b, b_w, b_b = per_expert(rank, d_in), per_expert(rank), per_expert(d_out, rank), per_expert(d_out)
    out = kernels.mole_linear(z, counts, p, 0.5, weight, bias, gate, a_w, a_b, b_w, b_b)
    out.mul_(2)  # the output is a tensor of its own: in-place use after the kernel is allowed
    out.backward(torch.randn_like(out))
    leaves = [z, weight, bias, *a_w, *a_b, *b_w, *b_b] + ([gate] if gated else [])
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("gated", [False, True], ids=["sparse", "gated"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_bucketed_segment_windows_match_exact_rows(monkeypatch, gated, p):
    # On CPU in bf16 / fp16 each segment's small GEMMs run on windows of bucketed row counts; forced on
    # in float64 they must give what the exact segment rows give, for segments shorter and longer than
    # their bucket, at the start, in the middle and at the end (spare rows) of the tensor.
    for counts in ([5, 70, 3], [1, 1, 1], [66], [9, 130, 17, 2]):
        monkeypatch.setattr(kernels, "stable_segment_shapes", lambda t: False)
        exact = _mole_linear_run(counts, gated, p)
        monkeypatch.setattr(kernels, "stable_segment_shapes", lambda t: True)
        for got, want in zip(_mole_linear_run(counts, gated, p), exact):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_segment_gemms_keep_their_shapes_across_routings():
    # oneDNN builds a kernel per new GEMM shape in bf16 on CPU: two routings whose segments fall into the
    # same buckets must run exactly the same GEMM shapes (exact rows would give different ones).
    from torch.utils._python_dispatch import TorchDispatchMode

    gemms = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}

    class GemmShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in gemms:
                self.shapes.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and a.dim() == 2))
            return func(*args, **(kwargs or {}))

    def shapes(counts):
        with GemmShapes() as mode:
            _mole_linear_run(counts, gated=True, p=0.1, dtype=torch.bfloat16)
        return mode.shapes

    assert kernels.stable_segment_shapes(torch.empty(1, dtype=torch.bfloat16))
    assert not kernels.stable_segment_shapes(torch.empty(1))
    assert shapes([100, 60, 40]) == shapes([97, 63, 40])  # buckets 104, 64, 40 both times
    assert shapes([100, 60, 40]) != shapes([100, 80, 20])


def _has_c_compiler() -> bool:
    import shutil

    return bool(shutil.which("cc") or shutil.which("gcc"))


def test_native_dropout_generator_is_splitmix64_and_seeded(monkeypatch):
    from movekd.mole import native_rng

    if _has_c_compiler():  # a machine with a C compiler must get the fast path
        assert native_rng.available()
    if not native_rng.available():
        pytest.skip("no C compiler: the mt19937 fallback is tested below")
    words = torch.empty(9, dtype=torch.int64)
    seed = 2**64 - 12345
    assert native_rng.fill_random_words(words, seed)
    assert [w & (2**64 - 1) for w in words.tolist()] == native_rng.splitmix64_words(seed, 9)
    # lanes repeat under torch.manual_seed and do not depend on the thread count
    previous, drawn = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(3)
            drawn.append(kernels.dropout_mask(torch.Size([300, 1000]), 0.05, torch.device("cpu")).lanes())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(drawn[0], drawn[1])
    dropped = kernels.keep_mask(drawn[0], 0.05, torch.bool).logical_not_().float().mean().item()
    assert abs(dropped - 0.05) < 0.003
    # switched off: mt19937 draws instead, other lanes with the same rate
    monkeypatch.setattr(native_rng, "_library", None)
    torch.manual_seed(3)
    fallback = kernels.dropout_mask(torch.Size([300, 1000]), 0.05, torch.device("cpu")).lanes()
    assert not torch.equal(fallback, drawn[0])
    assert abs(kernels.keep_mask(fallback, 0.05, torch.bool).logical_not_().float().mean().item() - 0.05) < 0.003


def test_native_dropout_generator_builds_once_into_the_cache(monkeypatch, tmp_path):
    import subprocess

    from movekd.mole import native_rng

    if not _has_c_compiler():
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("MOVEKD_CACHE", str(tmp_path))
    monkeypatch.setattr(native_rng, "_library", native_rng._UNSET)
    assert native_rng.available()
    built = list((tmp_path / "native").glob("splitmix64-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("tmp*"))  # no temporary left behind

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    monkeypatch.setattr(native_rng, "_library", native_rng._UNSET)
    assert native_rng.available()  # loaded from the cache
    monkeypatch.setenv("MOVEKD_NATIVE_RNG", "0")
    monkeypatch.setattr(native_rng, "_library", native_rng._UNSET)
    assert not native_rng.available() and not native_rng.fill_random_words(torch.empty(4, dtype=torch.int64), 1)
    assert native_rng.apply_dropout(torch.ones(64, dtype=torch.bfloat16), 1, 0) is None


def test_native_dropout_generator_falls_back_to_simpler_flags(monkeypatch, tmp_path):
    from movekd.mole import native_rng

    if not _has_c_compiler():
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("MOVEKD_CACHE", str(tmp_path))
    monkeypatch.setattr(native_rng, "_FLAG_SETS", (["-O3", "--no-such-flag"], ["-O3"]))
    monkeypatch.setattr(native_rng, "_library", native_rng._UNSET)
    assert native_rng.available()  # the first set fails to compile, the second builds
    words = torch.empty(3, dtype=torch.int64)
    assert native_rng.fill_random_words(words, 2)
    assert [w & (2**64 - 1) for w in words.tolist()] == native_rng.splitmix64_words(2, 3)
    # a generic build draws words but does not fuse the dropout (slower than PyTorch's masking)
    assert native_rng.apply_dropout(torch.ones(64, dtype=torch.bfloat16), 1, 0) is None


class _RecordingLibrary:
    """Stands in for the compiled generator: records the thread count each fill asks for."""

    def __init__(self):
        self.threads = []

    def movekd_splitmix64_fill(self, pointer, count, seed, threads):
        self.threads.append(threads)


def _fill_in_child(threads: int) -> None:
    from movekd.mole import native_rng

    torch.set_num_threads(threads)
    recorder = _RecordingLibrary()
    native_rng._library = recorder
    native_rng.fill_random_words(torch.empty(1 << 18, dtype=torch.int64), 1)
    raise SystemExit(0 if recorder.threads == [1] else 1)


def test_native_dropout_generator_in_a_forked_child(monkeypatch):
    # libgomp hangs when a process forked after its parent used OpenMP threads starts threads itself
    # (measured: a forked child filling with 2 threads never returned): in a forked child the generator
    # asks for one thread, in the process that imported it for torch's thread count.
    import multiprocessing

    from movekd.mole import native_rng

    recorder = _RecordingLibrary()
    monkeypatch.setattr(native_rng, "_library", recorder)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        native_rng.fill_random_words(torch.empty(8, dtype=torch.int64), 1)
    finally:
        torch.set_num_threads(previous)
    assert recorder.threads == [2]
    child = multiprocessing.get_context("fork").Process(target=_fill_in_child, args=(2,))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "a forked child asked for more than one OpenMP thread"


def test_fused_dropout_zeroes_exactly_what_the_lanes_drop():
    # The one-pass dropout derives each element's lane from the seed: it must zero exactly the entries
    # the lanes of the same seed drop, for 2-, 4- and 8-byte elements, sizes off the 32-lane blocks,
    # the multi-threaded size, in place or not, with 1 or 2 threads.
    from movekd.mole import native_rng

    if not _has_c_compiler():
        pytest.skip("no C compiler on this machine")
    cpu, seed, p = torch.device("cpu"), 2**63 + 17, 0.3
    threshold = kernels.lane_threshold(p)
    assert native_rng.apply_dropout(torch.ones(8, dtype=torch.bfloat16), seed, threshold) is not None
    previous = torch.get_num_threads()
    try:
        for numel in (1, 31, 33, 1000, 300_001):
            lanes = kernels.draw_dropout_lanes(torch.Size([numel]), cpu, seed)
            for dtype in (torch.bfloat16, torch.float32, torch.float64):
                src = torch.rand(numel, dtype=dtype) + 1  # no zeros of its own
                want = src * kernels.keep_mask(lanes, p, dtype)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    assert torch.equal(native_rng.apply_dropout(src, seed, threshold), want), (numel, dtype)
                in_place = src.clone()
                assert native_rng.apply_dropout(in_place, seed, threshold, out=in_place) is in_place
                assert torch.equal(in_place, want)
    finally:
        torch.set_num_threads(previous)
    assert abs((want == 0).double().mean().item() - p) < 0.003
    # what it cannot take, it leaves to PyTorch's masking
    assert native_rng.apply_dropout(torch.ones(4, 4).t(), seed, threshold) is None  # not contiguous
    assert native_rng.apply_dropout(torch.ones(4, dtype=torch.uint8), seed, threshold) is None
    with pytest.raises(ValueError, match="shape"):
        kernels.dropout_mask(torch.Size([3, 4]), p, cpu).apply(torch.ones(4, 3))


@pytest.mark.parametrize("gated", [False, True], ids=["sparse", "gated"])
def test_mole_linear_dropout_keeps_a_seed_not_a_mask(monkeypatch, gated):
    # The kernel saves drop(z) but no mask (no int16 / bool / lanes tensor); forward and backward give
    # what the mask of the lanes of its seed gives, kept as a tensor.
    from movekd.mole import native_rng

    made, saved = [], []
    real = kernels.dropout_mask
    monkeypatch.setattr(kernels, "dropout_mask", lambda *args: made.append(real(*args)) or made[-1])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        seeded = _mole_linear_run([7, 13], gated, 0.3)
    assert len(made) == 1 and isinstance(made[0], kernels.SeededDropoutMask)
    assert all(t.dtype == torch.float64 for t in saved)
    assert sum(t.shape == made[0].shape for t in saved) == 2  # z and drop(z)
    lanes = made[0].lanes()

    def stored(shape, p, device):  # draws its seed as well, so the gradient fed to backward is the same
        native_rng.draw_seed()
        return kernels.StoredDropoutMask(lanes, p)

    monkeypatch.setattr(kernels, "dropout_mask", stored)
    for got, want in zip(seeded, _mole_linear_run([7, 13], gated, 0.3)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_rate_and_train_mode_noise():
    mask = kernels.bernoulli_mask(torch.Size([200, 1000]), 0.05, torch.device("cpu"))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.05) < 0.003
    m = layer("sparse", dropout=0.5).train()
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        assert (m(x) - reference_ffn(m, x)).abs().max() > 1e-4  # dropout active in training
        m.eval()
        torch.testing.assert_close(m(x), reference_ffn(m, x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- router probabilities
def test_collect_router_probs_fresh_and_attached():
    torch.manual_seed(0)
    model = inject_mole(tiny("timm"), rank=4).train()
    images = torch.randn(2, 3, 32, 32)
    model(images)
    probs = collect_router_probs(model)
    assert [p.shape for p in probs] == [torch.Size([2, 65, 3])] * 2
    assert all(p.grad_fn is not None for p in probs)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 65))
    # an early-exit forward that bypasses the model's __call__: the stale second layer is left out
    model.forward_intermediates(images[:1], indices=[0], stop_early=True, intermediates_only=True)
    fresh = collect_router_probs(model)
    assert len(fresh) == 1 and fresh[0].shape[0] == 1
    # eval / no_grad forwards record nothing, and clear what an earlier call left
    with torch.no_grad():
        model(images)
    assert collect_router_probs(model) == []
    # eval mode with frozen routers and an input without grad: autograd records nothing, nor do we
    model.eval().requires_grad_(False)
    model(images)
    assert collect_router_probs(model) == [] and all(m.router_probs is None for m in mole_layers(model))
    model.requires_grad_(True)
    with record_router_probs(model), torch.no_grad():
        model(images)
    assert len(collect_router_probs(model, clear=True)) == 2
    assert collect_router_probs(model) == []


def test_router_probs_recorded_in_eval_mode_with_autograd_on():
    """A student kept in eval mode (dropout off) while training still feeds the balance loss."""
    torch.manual_seed(0)
    model = inject_mole(tiny("timm"), rank=4).eval()
    images = torch.randn(2, 3, 32, 32)
    model(images)
    probs = collect_router_probs(model)
    assert [p.shape for p in probs] == [torch.Size([2, 65, 3])] * 2
    balance_loss(probs).backward()
    routers = [m.router.weight for m in mole_layers(model)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)
    # only the routers frozen, the input recorded by autograd (earlier layers train): still recorded
    for m in mole_layers(model):
        m.router.requires_grad_(False)
    model(images.requires_grad_(True))
    assert len(collect_router_probs(model)) == 2
    with torch.no_grad():
        model(images)
    assert collect_router_probs(model) == []


# ---------------------------------------------------------------- precision and compilation
@pytest.mark.parametrize("routing", ROUTINGS)
def test_autocast_bf16(routing):
    m = layer(routing, dropout=0.05).train()
    x = torch.randn(2, 65, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        loss = out.float().square().mean() + balance_loss([m.router_probs])
    assert out.dtype == torch.bfloat16 and m.router_probs.dtype == torch.float32
    loss.backward()
    for p in (m.moe_down[0].lora_A.weight, m.moe_up[1].lora_B.weight, m.fc1.weight, m.router.weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        full = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(x)
    assert (half.float() - full).abs().mean() < 0.02 * full.abs().mean()
    # a whole model runs under autocast too
    model = inject_mole(tiny("timm"), rank=4, routing=routing).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, torch.randn(2, 3, 32, 32)).float().mean().backward()


def _compile_check(backend: str) -> None:
    torch.manual_seed(0)
    model = inject_mole(tiny("clip"), rank=4, routing="gated", dropout=0.0).train()
    images = torch.randn(2, 3, 32, 32)
    eager = run(model, images)
    eager_probs = collect_router_probs(model)
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # second call: no stale state, no error on re-entry
        out = compiled(pixel_values=images).last_hidden_state
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        probs = collect_router_probs(model)
        assert len(probs) == 2
        torch.testing.assert_close(probs[1], eager_probs[1])
    (out.square().mean() + balance_loss(probs)).backward()
    assert mole_layers(model)[0].router.weight.grad.abs().sum() > 0


def test_torch_compile_graph_capture():
    _compile_check("aot_eager")  # dynamo tracing + AOT autograd, without inductor's code generation


@pytest.mark.slow
def test_torch_compile_inductor():
    _compile_check("inductor")


# ---------------------------------------------------------------- benchmark function and CLI
def test_bench_function_schema_and_cli(capsys, tmp_path):
    from movekd.bench import run_mole_bench
    from movekd.bench.mole import MODES
    from movekd.cli import bench

    result = run_mole_bench(tokens=8, dim=32, hidden=64, rank=4, batches=(1, 2), precisions=("fp32", "bf16"),
                            repeats=1, warmup=0)
    assert result["variants"] == ["plain", "lora", "dense_masked", "folded", "index_scatter"]
    assert [(c["precision"], c["batch"], c["mode"]) for c in result["cases"]] == [
        (p, b, m) for p in ("fp32", "bf16") for b in (1, 2) for m in MODES]
    for case in result["cases"]:
        expected = {"lora", "dense_masked", "index_scatter"} | ({"folded"} if case["mode"] == "inference" else set())
        for key in ("ratio", "cpu_ratio", "min_ratio"):
            assert set(case[key]) == expected and all(r > 0 for r in case[key].values())
        assert set(case["seconds"]) == expected | {"plain"}
    # folded keeps E copies of fc1 + fc2 (weights and biases) in the compute dtype
    ffn_params = 32 * 64 + 64 + 64 * 32 + 32
    assert result["fold_extra_bytes"] == {"fp32": 3 * ffn_params * 4, "bf16": 3 * ffn_params * 2}
    assert result["gflops"]["2"]["mole"] > result["gflops"]["2"]["plain"] > result["gflops"]["1"]["plain"] > 0
    gated = run_mole_bench(tokens=8, dim=32, hidden=64, rank=4, batches=(1,), precisions=("fp32",), repeats=1,
                           warmup=0, routing="gated")
    assert gated["variants"] == ["plain", "lora", "dense_masked"]  # folding and the reference are sparse-only
    with pytest.raises(ValueError, match="precision"):
        run_mole_bench(tokens=8, dim=32, hidden=64, precisions=("fp16",))
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    plot = tmp_path / "mole.png"
    args = parser.parse_args(["bench", "mole", "--json", "--tokens", "4", "--repeats", "1", "--batch", "1,2",
                              "--precision", "bf16", "--plot", str(plot)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.split("plot written")[0])
    assert printed["config"]["tokens"] == 4 and printed["config"]["precisions"] == ["bf16"]
    assert printed["config"]["batches"] == [1, 2] and plot.stat().st_size > 0
    table = bench.BENCHES["mole"][1](printed)
    assert "index_scatter" in table and "folded: extra memory" in table
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "mole", "--precision", "fp16"])
    args = parser.parse_args(["bench", "mole", "--json", "--tokens", "4", "--repeats", "1", "--batch", "1",
                              "--precision", "fp32", "--mode", "inference"])
    assert args.func(args) == 0
    assert [c["mode"] for c in json.loads(capsys.readouterr().out)["cases"]] == ["inference"]
    with pytest.raises(ValueError, match="modes"):
        run_mole_bench(tokens=8, dim=32, hidden=64, modes=("serve",))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_index_scatter_reference_equals_mole(mode):
    from movekd.bench.mole_reference import IndexScatterMoLE

    m = layer("sparse").train(mode == "train")  # dropout 0: the two draw different masks otherwise
    ref = IndexScatterMoLE(m).train(mode == "train")
    x = torch.randn(2, 65, 32, requires_grad=True)
    params = list(m.parameters())
    out, want = m(x), ref(x)
    torch.testing.assert_close(want, reference_ffn(m, x), rtol=0, atol=1e-5)  # the official semantics
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.router_probs, m.router_probs)
    for got, expected in zip(grads(out, [x] + params), grads(want, [x] + params)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sparse"):
        IndexScatterMoLE(layer("gated"))


def test_set_fold_inference_switches_every_layer():
    from movekd.mole import set_fold_inference

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = inject_mole(Dinov2Model(config), rank=4, dropout=0.0, routing="sparse").eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        grouped = model(pixels).last_hidden_state
        assert set_fold_inference(model, True) == 2
        folded = model(pixels).last_hidden_state
        assert all(m._fold_cache is not None for m in mole_layers(model))
        assert set_fold_inference(model, False) == 2
        assert all(m._fold_cache is None for m in mole_layers(model))  # copies freed
        assert set_fold_inference(model, "auto") == 2  # folded exactly where weights can be pre-packed
        auto = model(pixels).last_hidden_state
        packable = kernels.packed_linear_supported(torch.device("cpu"), torch.float32)
        assert all((m._fold_cache is not None) == packable for m in mole_layers(model))
    torch.testing.assert_close(folded, grouped, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto, grouped, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fold_inference"):
        set_fold_inference(model, "yes")
