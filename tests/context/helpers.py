"""Tiny random-weight models and a character tokenizer for context-memory tests (fp32, CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from memllm.config import MemoryConfig

VOCAB = 512
TRAINED = 512


def tiny_model(
    kind: str = "llama", seed: int = 0, layers: int = 2, trained: int = TRAINED
) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=trained,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}  # fmt: skip
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    # Sharper attention than the default init, so that retrieval choices matter in the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(4.0)
    return model.eval()


def small_memory(**kw: Any) -> MemoryConfig:
    # selector "question": the tests of the selection machinery; the default ("lexical", with the
    # packaged MiniLM) has its own tests (test_select.py)
    base = dict(n_init=4, n_local=48, block_size=8, repr_topk=2, topk=3, exc_block_size=8, chunk_size=32,
                offload_dtype="fp32", selector="question")  # fmt: skip
    base.update(kw)
    return MemoryConfig(**base)


class CharTokenizer:
    """ASCII characters as token ids (vocab 128); id 0 is EOS."""

    eos_token_id = 0
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != 0)


@dataclass
class FakeLLM:
    """What Session needs from MemLLM."""

    model: Any
    tokenizer: Any
    name: str = "tiny"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def trained_len(self) -> int:
        return self.model.config.max_position_embeddings


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def kernel_devices() -> list:
    """Where Triton kernel tests run (parametrize values): CUDA, marked `gpu` so that `pytest -m gpu`
    selects them on a GPU machine, else the CPU under TRITON_INTERPRET=1, else nowhere."""
    if torch.cuda.is_available():
        return [pytest.param("cuda", marks=pytest.mark.gpu)]
    return ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []


def skip_interpreted_runtime_loops(device: str) -> None:
    """Skip a kernel test on the CPU whose kernel loops over a runtime bound (`range(0, n, C)`):
    Triton 3.6's interpreter turns the bound into a Python int with int() of a one-element array,
    an error since NumPy 2.4 (the same tests pass under the interpreter with NumPy 2.3, and on CUDA)."""
    import numpy

    if device == "cpu" and tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        import pytest

        pytest.skip("Triton's interpreter cannot run a loop over a runtime bound with NumPy >= 2.4")
