"""Turn every plain FFN of a ViT into a ``MoLEFFN`` in place, and read the router probabilities back.

Supported FFNs (forward ``fc1 -> act [-> drop1 -> norm] -> fc2 [-> drop2]``):

- HF ``CLIPMLP`` (``encoder.layers[i].mlp`` of a transformers-5 ``CLIPVisionModel``; 4.x had a
  ``vision_model.`` prefix), ``SiglipMLP``, ``Siglip2MLP``,
  ``Dinov2MLP`` (``encoder.layer[i].mlp``), ``Dinov2WithRegistersMLP``: ``fc1``, ``activation_fn``, ``fc2``.
- timm ``Mlp`` (``blocks[i].mlp`` of ``VisionTransformer``, Eva, ...): ``fc1``, ``act``, ``drop1``,
  ``norm``, ``fc2``, ``drop2`` (Linear layers only, not ``use_conv``).

Gated FFNs (SwiGLU: DINOv2-giant, EVA-02, timm ``GluMlp``/``SwiGLU``) raise: a LoRA on "fc1" would
have to choose between the gate and value branches, which the paper does not define.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn

from movekd.mole.layer import FOLD_CHOICES, MoLEFFN

# (top-level package of the defining module, class name) -> names of the modules between fc1 and fc2
# (activation first) and after fc2, in forward order.
_PLAIN_FFNS: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("transformers", "CLIPMLP"): (("activation_fn",), ()),
    ("transformers", "SiglipMLP"): (("activation_fn",), ()),
    ("transformers", "Siglip2MLP"): (("activation_fn",), ()),
    ("transformers", "Dinov2MLP"): (("activation_fn",), ()),
    ("transformers", "Dinov2WithRegistersMLP"): (("activation_fn",), ()),
    ("timm", "Mlp"): (("act", "drop1", "norm"), ("drop2",)),
}
_GATED_FFNS = {
    "Dinov2SwiGLUFFN", "Dinov2WithRegistersSwiGLUFFN", "DINOv3ViTGatedMLP", "GluMlp", "SwiGLU",
    "SwiGLUPacked", "GatedMlp",
}
MOLE_PARAM_KEYS = ("router", "moe_down", "moe_up")


def _ffn_plan(module: nn.Module, path: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The (mid, post) module names if ``module`` is a supported FFN, None if it is no FFN at all."""
    name = type(module).__name__
    plan = _PLAIN_FFNS.get((type(module).__module__.split(".")[0], name))
    if plan is not None:
        linear = [isinstance(getattr(module, n, None), nn.Linear) for n in ("fc1", "fc2")]
        if not all(linear):
            raise ValueError(f"{path} ({name}): fc1/fc2 must be nn.Linear (conv MLPs are not supported)")
        return plan
    if name in _GATED_FFNS:
        raise ValueError(
            f"{path} is a gated FFN ({name}); MoLE supports only plain fc1 -> act -> fc2 MLPs "
            f"({', '.join(n for _, n in _PLAIN_FFNS)})"
        )
    return None


def inject_mole(
    model: nn.Module,
    num_experts: int = 3,
    rank: int = 32,
    alpha: float = 1.0,
    dropout: float = 0.05,
    routing: str = "sparse",
    init: str = "paper",
    *,
    top_k: int = 2,
    fold_inference: bool | str = False,
    grouped_kernel: str = "segments",
    module_filter: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Replace every supported FFN in ``model`` by a ``MoLEFFN`` (paper Eq. 1), in place.

    Defaults are the paper/official settings (E=3, r=32, alpha=1 so scaling 1/32, dropout 0.05, sparse
    top-1, kaiming-initialised B); on CLIP ViT-L/14-336 they add 24,040,008 parameters. New
    parameters are created on the device and dtype of each FFN's fc1.

    Args:
        routing: ``"sparse" | "gated" | "dense" | "topk"`` (see ``movekd.mole.layer``).
        init: ``"paper"`` (official kaiming B: output changes at step 0) or ``"zero_b"`` (unchanged).
        top_k: experts per token for ``routing="topk"``.
        fold_inference: fold experts into per-expert fc1/fc2 copies for sparse eval (no LoRA FLOPs, E
            extra copies of the FFN weights in memory); ``"auto"``: only where they can be pre-packed
            (CPU with oneDNN).
        grouped_kernel: kernel of top-1 routing (sparse/gated) outside folded inference:
            ``"segments"`` (tokens sorted by expert, each expert's LoRA on its own rows) or
            ``"dense_masked"`` (token order, all experts in one GEMM per side masked by the gates:
            fewer GEMM calls, E times the LoRA FLOPs; see ``movekd.mole.layer``).
        module_filter: optional predicate on the qualified module name (e.g. to skip a text tower).

    Returns:
        ``model`` itself. A forward pre-hook on it clears the recorded router probabilities at every
        call, so ``collect_router_probs`` never mixes layers from two forwards.
    """
    if any(isinstance(m, MoLEFFN) for m in model.modules()):
        raise ValueError("model already contains MoLE layers; inject_mole must be applied once")
    options = dict(
        num_experts=num_experts, rank=rank, alpha=alpha, dropout=dropout, routing=routing, top_k=top_k,
        init=init, fold_inference=fold_inference, grouped_kernel=grouped_kernel,
    )
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if module_filter is not None and not module_filter(path):
                continue
            plan = _ffn_plan(child, path)
            if plan is not None:
                targets.append((parent, child_name, child, plan))
    if not targets:
        raise ValueError(
            f"no supported FFN found in {type(model).__name__}; supported: "
            f"{', '.join(n for _, n in _PLAIN_FFNS)}"
        )
    for parent, child_name, ffn, plan in targets:
        setattr(parent, child_name, _wrap(ffn, plan, options))
    model.register_forward_pre_hook(_clear_router_probs)
    return model


def wrap_ffn(ffn: nn.Module, **options) -> MoLEFFN:
    """One supported FFN as a ``MoLEFFN`` (same options as ``inject_mole``); its weights are shared."""
    plan = _ffn_plan(ffn, type(ffn).__name__)
    if plan is None:
        raise ValueError(f"unsupported FFN {type(ffn).__name__}; supported: {', '.join(n for _, n in _PLAIN_FFNS)}")
    return _wrap(ffn, plan, options)


def _wrap(ffn: nn.Module, plan: tuple[tuple[str, ...], tuple[str, ...]], options: dict) -> MoLEFFN:
    mid, post = plan
    layer = MoLEFFN(
        ffn.fc1, ffn.fc2, [(n, getattr(ffn, n)) for n in mid], [(n, getattr(ffn, n)) for n in post], **options
    )
    return layer.train(ffn.training)


def _clear_router_probs(module: nn.Module, args: tuple) -> None:
    # Uses the module it is called on (not a captured list), so deep copies clear their own layers.
    for m in module.modules():
        if isinstance(m, MoLEFFN):
            m.router_probs = None
            m.router_tick = None


def mole_layers(model: nn.Module) -> list[MoLEFFN]:
    """The MoLE layers of ``model`` in module (= depth) order."""
    return [m for m in model.modules() if isinstance(m, MoLEFFN)]


def set_fold_inference(model: nn.Module, enabled: bool | str = True) -> int:
    """Switch the folded inference path of every MoLE layer of ``model`` on (True), off (False) or to
    ``"auto"`` (folded where the weights can be pre-packed: CPU with oneDNN, where ``movekd bench mole``
    measured it faster than the LoRA path); returns how many layers were switched. Folding applies to
    sparse routing in eval mode without autograd; it trades E extra copies of each FFN's weights (built
    lazily at the first eval forward) for no LoRA FLOPs. Switching off frees the copies."""
    if enabled not in FOLD_CHOICES:
        raise ValueError(f"fold_inference must be one of {FOLD_CHOICES}, got {enabled!r}")
    layers = mole_layers(model)
    for layer in layers:
        layer.fold_inference = enabled
        if not enabled:
            layer.clear_fold_cache()
    return len(layers)


def collect_router_probs(model: nn.Module, clear: bool = False) -> list[Tensor]:
    """Router probabilities ``[B, S, E]`` of the last forward of ``model``, one per MoLE layer that ran.

    They are recorded whenever autograd records the routers' forward (autograd on and the router or
    its input requires grad), in train or eval mode; in training mode with autograd on; and inside
    ``record_router_probs``. They stay attached to the graph, so ``balance_loss(collect_router_probs(model))`` trains the
    routers. Layers that did not run in the last forward (early exit, ``forward_intermediates``) are
    left out rather than returned stale: records are cleared at every call of the injected model, and
    a record older than the first MoLE layer's (the first block always runs first) is dropped.
    ``clear=True`` drops the references afterwards.
    """
    layers = [m for m in mole_layers(model) if m.router_probs is not None]
    if layers and layers[0].router_tick is not None:
        start = layers[0].router_tick
        layers = [m for m in layers if m.router_tick is None or m.router_tick >= start]
    probs = [m.router_probs for m in layers]
    if clear:
        for m in mole_layers(model):
            m.router_probs = None
            m.router_tick = None
    return probs


@contextmanager
def record_router_probs(model: nn.Module) -> Iterator[None]:
    """Record router probabilities in any mode (e.g. expert-usage statistics at eval time)."""
    layers = mole_layers(model)
    previous = [m.record_probs for m in layers]
    for m in layers:
        m.record_probs = True
    try:
        yield
    finally:
        for m, flag in zip(layers, previous):
            m.record_probs = flag


def mole_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the MoLE routers and experts (trainable in stage 1)."""
    for layer_name, layer in model.named_modules():
        if isinstance(layer, MoLEFFN):
            for key in MOLE_PARAM_KEYS:
                for name, p in getattr(layer, key).named_parameters():
                    yield f"{layer_name}.{key}.{name}", p
