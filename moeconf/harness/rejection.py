"""``config_rejects_invalid``: a config that describes no valid MoE layer must be refused, not run.

k > E, a group count that does not divide E, more kept groups than groups, k beyond the experts of the
kept groups: the reference has no answer for these (``registry.config_space.InvalidConfig``), and a
block that builds and computes anyway misroutes in silence (it picks masked experts, or experts that do
not exist modulo something). The check builds the transformers block from the config and runs one
forward: the config class or the block raising is a pass, an output is a fail.
"""

from __future__ import annotations

import torch

from moeconf.harness.checks import Outcome
from moeconf.hf.block import build_block
from moeconf.registry.entry import ArchEntry

REJECTION_CHECK = "config_rejects_invalid"


def rejection_outcome(probe: ArchEntry, config_error: BaseException | None, why: str, one_line) -> Outcome:  # type: ignore[no-untyped-def]
    """Whether the config class or the block (built from ``probe``'s config, tiny sizes) refuses it.

    ``why``: the reference's reason the config is invalid; ``one_line`` formats an exception.
    """
    if config_error is not None:
        return Outcome(True, message=f"rejected by the config class: {one_line(config_error)}")
    hidden_size = probe.spec.hidden
    try:
        block = build_block(probe).train(probe.train_mode)
        kwargs = {}
        if probe.token_types_kwarg is not None:
            kwargs[probe.token_types_kwarg] = torch.zeros(2, 4, dtype=torch.int64)
        with torch.no_grad():
            block(torch.randn(2, 4, hidden_size, generator=torch.Generator().manual_seed(0)), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any refusal counts, whatever its type
        return Outcome(True, message=f"rejected by the block: {one_line(exc)}")
    return Outcome(
        False,
        message=f"the block accepted a config that describes no valid layer ({why}) and computed an output: "
        "it routes in silence where it should raise",
    )
