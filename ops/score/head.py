"""The LM output head (hidden state -> logits) in float32, shared by both scoring backends.

The transformers backend takes it from the loaded model; the vLLM backend, which only returns final hidden
states (a pooling model), loads the same weights from the checkpoint's safetensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)


class OutputHead:
    """``logits = transform(hidden @ W.T + b)`` in float32, including the config's logit scaling/soft-capping."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, scale: float = 1.0,
                 softcap: Optional[float] = None):
        self.weight = weight.detach().float()
        self.bias = bias.detach().float() if bias is not None else None
        self.scale = float(scale)
        self.softcap = float(softcap) if softcap else None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.to(self.weight.device, torch.float32) @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def from_model(cls, model) -> "OutputHead":
        out = model.get_output_embeddings()
        return cls(out.weight, getattr(out, "bias", None), **_logit_transform(model.config))

    @classmethod
    def from_checkpoint(cls, model_dir: str, device: str | torch.device = "cpu") -> "OutputHead":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        weight_key, bias_key = _head_keys(config)
        tensors = _load_tensors(Path(model_dir), [k for k in (weight_key, bias_key) if k])
        if weight_key not in tensors:
            raise RuntimeError(f"output head weights {weight_key!r} not found in {model_dir}")
        weight = tensors[weight_key].to(device)
        bias = tensors[bias_key].to(device) if bias_key and bias_key in tensors else None
        return cls(weight, bias, **_logit_transform(config))


def _logit_transform(config) -> dict:
    # Final-logit post-processing some architectures do inside forward(); the exact entropy needs it too.
    scale = 1.0
    if getattr(config, "logit_scale", None):           # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):        # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return {"scale": scale, "softcap": getattr(config, "final_logit_softcapping", None)}  # Gemma 2/3


def _head_keys(config) -> tuple[str, Optional[str]]:
    """Checkpoint names of the output head's weight (tied: the input embedding's) and bias."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    owner = inp if out.weight is inp.weight else out  # tied weights are stored once, under the input name
    bias = f"{names[id(out)]}.bias" if getattr(out, "bias", None) is not None else None
    return f"{names[id(owner)]}.weight", bias


def _load_tensors(model_dir: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({weight_map[k] for k in keys if k in weight_map})
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    found: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as st:
            available = set(st.keys())
            for k in keys:
                if k in available:
                    found[k] = st.get_tensor(k)
    return found
