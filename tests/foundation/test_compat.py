"""memllm.compat: the cache goes to the model under the name its transformers version takes, warning-free."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from memllm.compat import cache_argument, cache_kwargs
from memllm.generation import generate_ids
from tests.context.helpers import tiny_model


def test_cache_argument_is_a_parameter_of_forward():
    model = tiny_model()
    name = cache_argument(type(model))
    assert name in inspect.signature(type(model).forward).parameters
    assert list(cache_kwargs(model, "c")) == [name]


def test_model_call_through_cache_kwargs_does_not_warn():
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, DynamicCache(config=model.config)))


def test_memllm_generation_does_not_warn():
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ids = list(
            generate_ids(
                model, torch.tensor([[1, 2, 3]]), cache=DynamicCache(config=model.config), max_new_tokens=3
            )
        )
    assert len(ids) == 3


def test_future_warning_from_memllm_code_is_an_error_in_the_fast_tier():
    code = compile("import warnings\nwarnings.warn('old', FutureWarning)\n", "<memllm.fake>", "exec")
    with pytest.raises(FutureWarning, match="old"):
        exec(code, {"__name__": "memllm.fake"})
