"""The CUDA/Triton fast paths of memllm.context, each named after the reference module it is tested
against (cuda/window.py against window.py, cuda/lookup.py against lookup.py, ...). Only
memllm.context.kernels imports them, once per cache; importing this package imports none of them
(they need Triton)."""
