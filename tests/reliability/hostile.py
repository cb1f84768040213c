"""Hostile backends: each breaks the backend contract in one way, on one architecture only.

Every backend here runs the transformers block as shipped (``hf-eager``) and corrupts one thing —
a field of the observation, the return value, the process (``sys.exit``), the clock (a hang), the
``supports()`` answer — but only on ``TARGET``. On ``BYSTANDER`` it behaves, so a test that runs both
archs proves the damage stays inside the target's records. They plug in as an outsider's backend
would: ``--backend tests.reliability.hostile:NAME``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable

import torch

from moeconf.backends import HFBlockBackend, Observation, RunRequest, StepsObservation, StepsRequest
from moeconf.harness.cases import CASES
from moeconf.registry import ArchEntry

TARGET = "mixtral"
"""Arch A: where the hostile backends misbehave."""
BYSTANDER = "qwen2_moe"
"""Arch B: where they behave (a different router family, with shared experts)."""

Corruption = Callable[[Observation, RunRequest], object]


class Corrupting(HFBlockBackend):
    """``hf-eager`` whose observation on ``TARGET`` is replaced by ``corrupt(observation, request)``."""

    def __init__(self, name: str, corrupt: Corruption) -> None:
        super().__init__(name)
        self.corrupt = corrupt

    def run(self, request: RunRequest) -> Observation:
        obs = super().run(request)
        return self.corrupt(obs, request) if request.entry.model_type == TARGET else obs  # type: ignore[return-value]


def _with(**fields: object) -> Corruption:
    """Replace observation fields by ``fields[name](obs)``."""
    return lambda obs, _req: dataclasses.replace(obs, **{k: f(obs) for k, f in fields.items()})  # type: ignore[operator]


def _grads(**changes: Callable[[torch.Tensor], object]) -> Corruption:
    def corrupt(obs: Observation, _req: RunRequest) -> Observation:
        grads = dict(obs.grads)
        for name, change in changes.items():
            grads[name.replace("__", ".")] = change(grads[name.replace("__", ".")])  # type: ignore[arg-type]
        return dataclasses.replace(obs, grads=grads)

    return corrupt


def _nan_last(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("nan")
    return t


# --- 1. malformed observations --------------------------------------------------------------------
expert_grad_transposed = Corrupting("expert-grad-transposed", _grads(experts__w_up=lambda g: g.transpose(1, 2)))
weights_k1 = Corrupting("weights-k1", _with(topk_weights=lambda o: o.topk_weights[:, :1]))
aux_not_scalar = Corrupting("aux-not-scalar", _with(aux_loss=lambda o: o.aux_loss.reshape(1).expand(3)))
returns_none = Corrupting("returns-none", lambda _obs, _req: None)
returns_numpy = Corrupting("returns-numpy", lambda obs, _req: obs.output.numpy())

# --- 4. dtypes ------------------------------------------------------------------------------------


class _IgnoresDtype(HFBlockBackend):
    """Computes in float64 whatever it is asked for: every tolerance passes, no bf16 math is tested."""

    def run(self, request: RunRequest) -> Observation:
        if request.entry.model_type == TARGET:
            request = dataclasses.replace(request, dtype=torch.float64)
        return super().run(request)


ignores_dtype = _IgnoresDtype("ignores-dtype")
grads_fp64 = Corrupting(
    "grads-fp64", _with(grads=lambda o: {k: None if g is None else g.double() for k, g in o.grads.items()})
)
router_fp32 = Corrupting(
    "router-fp32",
    _with(
        topk_weights=lambda o: o.topk_weights.float(),
        router_logits=lambda o: o.router_logits.float(),
        aux_loss=lambda o: o.aux_loss.float(),
        grads=lambda o: {k: g.float() if k.startswith("router.") else g for k, g in o.grads.items()},
    ),
)
"""Not hostile: routers kept in float32 in a bf16 model (``_keep_in_fp32_modules_strict``) are by design."""
input_grad_fp32 = Corrupting("input-grad-fp32", _grads(input=lambda g: g.float()))
"""The input's gradient in float32 in a bf16 run: the input was not in the compute dtype."""

# --- 5. a float topk_index ------------------------------------------------------------------------
float_index = Corrupting("float-index", _with(topk_index=lambda o: o.topk_index.double() + 0.5))

# --- 6. non-finite values: the code under test computing garbage ---------------------------------
nan_output = Corrupting("nan-output", _with(output=lambda o: _nan_last(o.output)))
inf_expert_grad = Corrupting(
    "inf-expert-grad", _grads(experts__w_down=lambda g: _nan_last(g).nan_to_num(nan=float("inf")))
)

# --- 7. contract breaches -------------------------------------------------------------------------
grads_list = Corrupting("grads-list", _with(grads=lambda o: list(o.grads.values())))
grads_unknown_name = Corrupting(
    "grads-unknown-name", _with(grads=lambda o: {**o.grads, "experts.w_upp": o.grads["experts.w_up"]})
)
grad_on_meta = Corrupting("grad-on-meta", _grads(experts__w_up=lambda g: torch.empty_like(g, device="meta")))
"""A grad on a device whose data cannot be read (the CPU stand-in for "a grad on the wrong device")."""
grad_on_cuda = Corrupting("grad-on-cuda", _grads(experts__w_up=lambda g: g.to("cuda")))
missing_grads_str = Corrupting("missing-grads-str", _with(missing_grads=lambda _o: "experts.w_up[3]"))
missing_grads_none = Corrupting("missing-grads-none", _with(missing_grads=lambda _o: None))


class _Exits(HFBlockBackend):
    def run(self, request: RunRequest) -> Observation:
        if request.entry.model_type == TARGET:
            sys.exit(3)
        return super().run(request)


exits = _Exits("exits")


class _Interrupted(HFBlockBackend):
    def run(self, request: RunRequest) -> Observation:
        raise KeyboardInterrupt


interrupted = _Interrupted("interrupted")


def _target_random(request: RunRequest) -> bool:
    """The ``random`` case (B=2, S=8) of ``TARGET``: the one call the hanging backends hang in."""
    return request.entry.model_type == TARGET and tuple(request.hidden.shape[:2]) == (CASES[0].batch, CASES[0].seq)


def stuck_in_kernel() -> None:
    """Where a hung backend is stuck; the timeout record must name it."""
    while True:
        time.sleep(0.02)


class _Hangs(HFBlockBackend):
    """Never returns on ``TARGET``, case ``random`` (the first) only: later cases must still run."""

    def run(self, request: RunRequest) -> Observation:
        if _target_random(request):
            stuck_in_kernel()
        return super().run(request)


hangs = _Hangs("hangs")


def blocked_in_native() -> None:
    """One long sleep: native code that a request to stop cannot reach until it returns."""
    time.sleep(20)


class _BlocksInNative(HFBlockBackend):
    def run(self, request: RunRequest) -> Observation:
        if _target_random(request):
            blocked_in_native()
        return super().run(request)


blocks_in_native = _BlocksInNative("blocks-in-native")

LOCK = threading.Lock()


def spin_holding_lock() -> None:
    """A Python-level busy loop inside a lock that every later call of the backend takes."""
    with LOCK:
        while True:
            pass


class _SpinsWithLock(HFBlockBackend):
    """Hangs burning CPU while holding ``LOCK`` on ``TARGET``/``random``; every other call takes ``LOCK``
    too. If the abandoned call kept running, every later case would time out as well."""

    def run(self, request: RunRequest) -> Observation:
        if _target_random(request):
            spin_holding_lock()
        with LOCK:
            return super().run(request)


spins_with_lock = _SpinsWithLock("spins-with-lock")


class _MutatesRequest(HFBlockBackend):
    """Writes into the request's tensors on ``TARGET`` (legal Python, illegal contract): the backends
    after it on the same case must still get the canonical inputs."""

    def run(self, request: RunRequest) -> Observation:
        obs = super().run(request)
        if request.entry.model_type == TARGET:
            with torch.no_grad():
                for p in request.params.values():
                    p.mul_(3.0)
                request.hidden.zero_()
                request.grad_output.neg_()
        return obs


mutates_request = _MutatesRequest("mutates-request")


class _SupportsRaises(HFBlockBackend):
    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        if entry.model_type == TARGET:
            raise RuntimeError("capability probe crashed")
        return super().supports(entry, dtype, device)


supports_raises = _SupportsRaises("supports-raises")


class _SupportsReturnsBool(HFBlockBackend):
    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return True if entry.model_type == TARGET else super().supports(entry, dtype, device)  # type: ignore[return-value]


supports_returns_bool = _SupportsReturnsBool("supports-returns-bool")


class _DtypesNone(HFBlockBackend):
    dtypes = None  # type: ignore[assignment]


dtypes_none = _DtypesNone("dtypes-none")


# --- 7. multi-rank backends returning the wrong form ------------------------------------------------
class FakeSession:
    """A multi-rank backend without ranks: ``run_session`` answers ``shape(observations, steps)``,
    where ``observations`` are hf-eager's (in process) and ``steps`` is an empty StepsObservation."""

    devices = ("cpu",)
    dtypes = ("fp32", "bf16")

    def __init__(self, name: str, shape: Callable[[list[Observation], StepsObservation | None], object]) -> None:
        self.name = name
        self.shape = shape
        self.inner = HFBlockBackend(name)

    def supports(self, entry: ArchEntry, dtype: str, device: str) -> str | None:
        return self.inner.supports(entry, dtype, device)

    def run(self, request: RunRequest) -> Observation:
        return self.inner.run(request)

    def run_session(self, requests: list[RunRequest], steps: StepsRequest | None) -> object:
        observations = [self.inner.run(r) for r in requests]
        if requests and requests[0].entry.model_type != TARGET:
            return observations, None
        return self.shape(observations, None if steps is None else StepsObservation([], [], [], []))


session_short = FakeSession("session-short", lambda obs, steps: (obs[:-1], steps))
session_long = FakeSession("session-long", lambda obs, steps: (obs + obs[:1], steps))
session_not_tuple = FakeSession("session-not-tuple", lambda obs, _steps: obs)
session_none = FakeSession("session-none", lambda _obs, _steps: None)
session_no_steps = FakeSession("session-no-steps", lambda obs, _steps: (obs, None))
session_empty_steps = FakeSession("session-empty-steps", lambda obs, steps: (obs, steps))
