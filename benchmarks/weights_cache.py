"""A GGUF model's dequantized weights saved once on the device machine, loaded from there by later calls.

Loading Qwen2.5-Coder-0.5B from its GGUF took ~47-52 s a call on the device (run 50: the tokenizer built from
the GGUF's vocabulary, the tensors dequantized), and `save_pretrained` refuses a model loaded from a GGUF
("quantized with GGUF and is not serializable") although transformers 5.17 holds its weights dequantized.
`save` detaches the GGUF quantizer from such a model (every parameter floating point) and saves it with its
tokenizer and a fingerprint: the logits of a fixed input, computed before saving. `load` refuses a cache
whose model does not give those logits again (a cache that is wrong fails loudly, never answers silently).
Where the weights stay packed (transformers that compute from quantized blocks) nothing is saved.
Imports only torch and transformers (checked with transformers 5.17 on the CPU: the same logits, max
difference 0.0; `python benchmarks/weights_cache.py --check DIR GGUF`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

FINGERPRINT = "memllm-fingerprint.json"
PROBE = [[1, 2, 3, 5, 8, 13, 21, 34]]  # ids every vocabulary holds
TOLERANCE = 1e-3  # of the largest logit: the same weights on the same device give the same logits


def fingerprint(model: torch.nn.Module) -> list[float]:
    """The last position's first 64 logits of PROBE, fp32, on the model's device."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor(PROBE, device=dev)).logits[0, -1, :64].float().cpu()
    return out.tolist()


def save(model: torch.nn.Module, tokenizer, folder: str | Path) -> str | None:
    """Save a model loaded from a GGUF (on the CPU, before it moves) -> None, or why nothing was saved."""
    folder = Path(folder)
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        return "its GGUF weights are kept packed"
    prints = fingerprint(model)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / FINGERPRINT).write_text(json.dumps(prints))
    return None


def load(folder: str | Path, dtype: torch.dtype):
    """(model, tokenizer) from a folder `save` wrote, on the CPU; ValueError where its logits differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    want = torch.tensor(json.loads((folder / FINGERPRINT).read_text()))
    got = torch.tensor(fingerprint(model))
    if not torch.allclose(got, want, rtol=0, atol=TOLERANCE * float(want.abs().max())):
        raise ValueError(f"the weights cache in {folder} does not give the model's logits again: delete it")
    return model, tokenizer


def ready(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / FINGERPRINT).exists()


def main() -> None:
    ap = argparse.ArgumentParser(description="Save a GGUF model's weights and load them back, timing both.")
    ap.add_argument("--check", nargs=2, metavar=("DIR", "GGUF"), required=True)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = args.check
    cache = Path(args.cache or Path(folder) / "weights-cache")
    t = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.bfloat16)
    t_gguf = time.time() - t
    why = save(model, tok, cache)
    if why:
        print(f"not cached: {why}")
        return
    t = time.time()
    load(cache, torch.bfloat16)
    print(json.dumps({"gguf_load_s": round(t_gguf, 2), "cache_load_s": round(time.time() - t, 2), "fingerprint": "equal"}))


if __name__ == "__main__":
    main()
