"""Rotary positions for context memory, computed with the model's own rotary embedding module.

Decision (see DESIGN.md "Positions"): the model rotates q/k at the position ids it was called with
(the cache reports a bounded length, so those stay < its trained length). memllm then rotates them
once more, by the angle between where the model put them and where memllm's rule wants them:
exact relative positions inside the local window (window keys are kept rotated at j - base; base is
moved forward, "re-based", before any position reaches the trained length), and one fixed distance
for sinks and retrieved units (kept rotated at 0: keys at position 0, queries at memory_distance,
MEMORY_DISTANCE or n_local where shorter, unless configured).
cos/sin come from `model.model.rotary_emb` (any rope_type it implements: default, llama3, yarn, ...)
at positions 0..trained_len-1, normalised by its attention scaling s (cos^2 + sin^2 = s^2), so a
rotation by a difference of positions composes exactly with the model's own: R(b - a) s R(a) = s R(b).
Only the rotate_half (non-interleaved) convention is supported.

Knows nothing of caches, units or the attention rule.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """Tables of normalised cos/sin for angles -(P-1)..(P-1) (P = max_positions), one per device (fp32)."""

    def __init__(self, rotary_module: torch.nn.Module, max_positions: int, head_dim: int):
        self.module = rotary_module
        self.max_positions = int(max_positions)
        self.head_dim = int(head_dim)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, -sin), each (2P - 1, head_dim) fp32; row i is the angle of position i - (P - 1)."""
        device = torch.device(device)
        if device not in self._tables:
            pos = torch.arange(self.max_positions, device=device).unsqueeze(0)  # (1, P)
            dummy = torch.zeros(1, 1, self.head_dim, device=device, dtype=torch.float32)
            with torch.no_grad():
                cos, sin = self.module(dummy, pos)
            cos, sin = cos[0].double(), sin[0].double()
            s = torch.sqrt(cos * cos + sin * sin)  # the rope's attention scaling, per element
            cos, sin = cos / s, sin / s
            cos_all = torch.cat([cos.flip(0)[:-1], cos]).float().contiguous()
            sin_all = torch.cat([-sin.flip(0)[:-1], sin]).float().contiguous()
            self._tables[device] = (cos_all, sin_all, (-sin_all).contiguous())
        return self._tables[device]

    def row(self, angle: int) -> int:
        """The table row of a rotation by `angle` positions (checked to be inside the trained length)."""
        if not -self.max_positions < angle < self.max_positions:
            raise ValueError(f"rotation by {angle} positions is outside the model's trained length")
        return angle + self.max_positions - 1

    def rows(self, start: int, n: int) -> int:
        """The table row of angle `start`, once angles start .. start + n - 1 are checked to have rows."""
        i = self.row(start)
        self.row(start + n - 1)
        return i

    def cos_sin(
        self, start: int, n: int, step: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (n, head_dim) for angles step * (start + t), t = 0..n-1 (step +1 or -1): no kernels."""
        cos, sin, nsin = self.tables(device)
        i = self.rows(start, n)
        return cos[i : i + n], (sin if step > 0 else nsin)[i : i + n]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by (cos, sin) (broadcast over leading dims), in fp32."""
        return torch.addcmul(x * cos, rotate_half(x), sin)

    def rotate(self, x: torch.Tensor, start: int, step: int = 1) -> torch.Tensor:
        """x (..., n, head_dim) rotated by step * (start + t) for its t-th row -> fp32."""
        cos, sin = self.cos_sin(start, x.shape[-2], step, x.device)
        return self.apply(x, cos, sin)

    def rotated(
        self,
        x: torch.Tensor,
        start: int,
        step: int,
        dtype: torch.dtype,
        per_row: bool = True,
    ) -> torch.Tensor:
        """`rotate(x, start, step)` (per_row) or `rotate_const(x, start)`, in `dtype`, with PyTorch ops
        (the one-launch CUDA version is kernels.CudaKernels.rotated, cuda/positions.py)."""
        out = self.rotate(x, start, step) if per_row else self.rotate_const(x, start)
        return out.to(dtype)

    def rotate_const(self, x: torch.Tensor, angle: int) -> torch.Tensor:
        """x rotated by one angle (all rows) -> fp32."""
        cos, sin, _ = self.tables(x.device)
        i = self.row(angle)
        return self.apply(x, cos[i], sin[i])
