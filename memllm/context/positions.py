"""Rotary positions for context memory, computed with the model's own rotary embedding module.

Decision (see DESIGN.md "Positions"): the model rotates q/k at the position ids it was called with
(always < its trained length; the cache reports a bounded sequence length). The attention function
un-rotates them with the inverse rotation at those same positions and re-rotates them where memllm's
rule puts them: exact relative positions inside the local window (window keys are kept rotated at
j - base, base moved forward before any position reaches the trained length), and one fixed distance
for sinks and retrieved units (kept un-rotated; keys at position 0, queries at n_local). cos/sin come from `model.model.rotary_emb` (any rope_type it implements: default,
llama3, yarn, ...); its attention scaling s (cos^2 + sin^2 = s^2) is kept, so logits carry s^2 as in
the model. Only the rotate_half (non-interleaved) convention is supported.

Knows nothing of caches, units or the attention rule.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """cos/sin table (positions 0..max_positions-1, fp32) from the model's rotary module, on one device."""

    def __init__(self, rotary_module: torch.nn.Module, max_positions: int, head_dim: int):
        self.module = rotary_module
        self.max_positions = int(max_positions)
        self.head_dim = int(head_dim)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (max_positions, head_dim) fp32 on `device`."""
        device = torch.device(device)
        if device not in self._tables:
            pos = torch.arange(self.max_positions, device=device).unsqueeze(0)  # (1, P)
            dummy = torch.zeros(1, 1, self.head_dim, device=device, dtype=torch.float32)
            with torch.no_grad():
                cos, sin = self.module(dummy, pos)
            self._tables[device] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return self._tables[device]

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(positions.device)
        return cos[positions], sin[positions]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (..., n, head_dim) fp32, positions (n,) long -> x rotated at `positions` (fp32)."""
        cos, sin = self._cos_sin(positions)
        return x * cos + rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of `rotate` (including the 1/s^2 of a scaled rope): x (..., n, head_dim) -> fp32."""
        cos, sin = self._cos_sin(positions)
        x = x.float()
        return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)

    def scale_at_zero(self, device: torch.device) -> torch.Tensor:
        """(head_dim,) fp32: what rotation at position 0 multiplies a vector by (s, the rope scaling)."""
        cos, _ = self.table(device)
        return cos[0]
