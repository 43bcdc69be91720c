"""MemoryConfig: every field is validated at construction, and the message names what is allowed."""

from __future__ import annotations

from dataclasses import fields

import pytest

from memllm.config import IMPLS, LOOKUPS, OFFLOAD_DTYPES, MemoryConfig
from memllm.errors import ConfigError

# One wrong value per field, with a piece of the message that must name the fix.
BAD = {
    "n_init": (-1, "must be > 0"),
    "n_local": (0, "must be > 0"),
    "block_size": (0, "must be > 0"),
    "repr_topk": ("4", "must be an integer"),
    "topk": (True, "must be an integer"),
    "exc_block_size": (1.5, "must be an integer"),
    "chunk_size": (0, "must be > 0"),
    "max_cached_blocks": (-3, "must be > 0"),
    "offload_dtype": ("bfloat16", "'bf16', 'fp16', 'fp32', 'int8'"),
    "device": ("gpu 0", "'cpu', 'cuda' or 'cuda:0'"),
    "impl": ("fsat", "'fast', 'reference'"),
    "lookup": ("perhead", "'shared', 'per_head'"),
    "decode_graphs": ("yes", "True or False"),
    "selector": ("bm25", "'question', 'hybrid', 'text', 'infllm'"),
    "select_neighbours": (-1, "must be > 0"),
    "paragraph_reach": (2.0, "must be an integer"),
    "memory_distance": (0, "must be > 0"),
    "device_unit_cache": (1, "True or False"),
}


def test_every_field_has_a_rejected_value():
    assert set(BAD) == {f.name for f in fields(MemoryConfig)}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_wrong_value_is_refused_naming_the_field_and_the_allowed_values(name):
    value, fix = BAD[name]
    with pytest.raises(ConfigError) as err:
        MemoryConfig(**{name: value})
    assert f"MemoryConfig.{name}" in str(err.value)
    assert fix in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("impl", IMPLS),
        ("lookup", LOOKUPS),
        ("offload_dtype", OFFLOAD_DTYPES),
        ("device", (None, "cpu", "cuda", "cuda:1")),
    ],
)
def test_the_allowed_values_are_accepted(name, values):
    for value in values:
        assert getattr(MemoryConfig(**{name: value}), name) == value


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="repr_topk"):
        MemoryConfig(block_size=4, repr_topk=8)
    with pytest.raises(ConfigError, match="at least block_size"):
        MemoryConfig(block_size=128, n_local=64)
    with pytest.raises(ConfigError, match="at least topk"):
        MemoryConfig(topk=16, max_cached_blocks=8)


def test_from_dict_refuses_unknown_fields_and_validates_known_ones():
    with pytest.raises(ConfigError, match="unknown MemoryConfig fields: lookups"):
        MemoryConfig.from_dict({"lookups": "shared"})
    with pytest.raises(ConfigError, match="MemoryConfig.lookup"):
        MemoryConfig.from_dict({"lookup": "perhead"})
    assert MemoryConfig.from_dict(MemoryConfig(topk=4).to_dict()) == MemoryConfig(topk=4)
