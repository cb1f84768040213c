"""Named tensor layouts: how a block stores canonical parameters (see ``moeconf.params``).

Each layout is a pair of pure functions: ``to_block`` builds the block's tensor from canonical
tensors, ``from_block`` splits a block tensor (a weight or its gradient) back into canonical ones.
Registry entries name layouts; they never carry code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """A reversible map between ``arity`` canonical tensors and one block tensor."""

    name: str
    arity: int
    to_block: Callable[..., torch.Tensor]
    from_block: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    doc: str


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Alternate the last dims: ``[..., n] + [..., n] → [..., 2n]`` as a0 b0 a1 b1 ..."""
    return torch.stack((a, b), dim=-1).flatten(-2)


def _deinterleave(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[..., 0::2], t[..., 1::2]


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("identity", 1, lambda t: t, lambda t: (t,), "stored as the canonical tensor"),
        Layout(
            "gate_up_rows",
            2,
            lambda g, u: torch.cat((g, u), dim=-2),
            lambda t: tuple(t.chunk(2, dim=-2)),
            "[E, 2I, H]: gate rows then up rows (transformers 5 default)",
        ),
        Layout(
            "gate_up_cols",
            2,
            lambda g, u: torch.cat((g, u), dim=-2).transpose(-1, -2),
            lambda t: tuple(x.transpose(-1, -2) for x in t.chunk(2, dim=-1)),
            "[E, H, 2I]: transposed, gate columns then up columns (Llama-4, Aria)",
        ),
        Layout(
            "gate_up_cols_interleaved",
            2,
            lambda g, u: _interleave(g.transpose(-1, -2), u.transpose(-1, -2)),
            lambda t: tuple(x.transpose(-1, -2) for x in _deinterleave(t)),
            "[E, H, 2I]: transposed, gate/up interleaved along 2I (GPT-OSS)",
        ),
        Layout(
            "gate_up_bias_interleaved",
            2,
            _interleave,
            _deinterleave,
            "[E, 2I]: gate/up biases interleaved (GPT-OSS)",
        ),
        Layout(
            "gate_up_bias_cat",
            2,
            lambda g, u: torch.cat((g, u), dim=-1),
            lambda t: tuple(t.chunk(2, dim=-1)),
            "[E, 2I]: gate biases then up biases (OpenAI privacy filter)",
        ),
        Layout(
            "transposed",
            1,
            lambda t: t.transpose(-1, -2),
            lambda t: (t.transpose(-1, -2),),
            "last two dims swapped (matmul layout [.., in, out])",
        ),
        Layout(
            "flat_experts",
            1,
            _flat_rows,
            lambda t: (t,),  # reshaped to canonical by the loader, which knows E
            "[E·I, H]: experts stacked along rows (DBRX w1/v1)",
        ),
        Layout(
            "flat_experts_transposed",
            1,
            lambda t: _flat_rows(t.transpose(-1, -2)),
            lambda t: (t,),
            "[E·I, H]: per-expert [I, H] = transposed down projection, stacked (DBRX w2)",
        ),
    )
}


def split_to_canonical(
    layout: Layout, block_tensor: torch.Tensor, shapes: tuple[tuple[int, ...], ...]
) -> tuple[torch.Tensor, ...]:
    """``from_block`` followed by a reshape to each canonical shape (needed by the flat layouts)."""
    parts = layout.from_block(block_tensor)
    if layout.name == "flat_experts_transposed":
        (shape,) = shapes  # canonical [E, H, I]; block rows are [E, I, H]
        e, h, i = shape
        return (parts[0].reshape(e, i, h).transpose(-1, -2),)
    return tuple(p.reshape(s) for p, s in zip(parts, shapes))
