"""Fetch LLaMA-Factory's released wheel and import only the modules moeconf audits.

Of the packages on the way to the two audited modules, one ``__init__`` pulls the training stack:
``llamafactory/model/__init__.py`` imports ``model.loader`` (trl, peft through ``model.adapter``, ...), which
``moe.py`` does not use. That one package is registered *bare* (``BARE``): a module object whose
``__path__`` is the wheel's folder and whose ``__init__.py`` is not executed. Every other module, the
audited ones and all they import (``llamafactory/__init__.py``, ``extras.misc``, ``extras.packages``,
``v1.accelerator.helper``, ...), runs unmodified from the wheel. No module is replaced by a stub.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

VERSION = "0.9.5"
MOE_MODULE = "llamafactory.model.model_utils.moe"
NPU_MODULE = "llamafactory.v1.plugins.model_plugins.kernels.ops.mlp.npu_fused_moe"
ROOT_ENV = "MOECONF_LLAMAFACTORY_ROOT"
"""Folder holding the unpacked ``llamafactory`` package (what ``unpack`` returns)."""


def download(dest: Path, version: str = VERSION) -> Path:
    """The wheel in ``dest`` (``pip download llamafactory==VERSION --no-deps``; reused when present)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"llamafactory-{version}-py3-none-any.whl"
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llamafactory=={version}", "--no-deps", "-d", str(dest)],
            check=True,
        )
    return wheel


def unpack(wheel: Path, dest: Path) -> Path:
    """Unpack ``wheel`` into ``dest`` (once) and return ``dest``, the folder that holds ``llamafactory/``."""
    if not (dest / "llamafactory" / "model" / "model_utils" / "moe.py").exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    return dest


def _bare_package(name: str, root: Path) -> None:
    """Register package ``name`` from ``root`` without running its ``__init__.py``."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    if parent:
        importlib.import_module(parent)  # a parent runs its own __init__ (llamafactory's is light)
    folder = root.joinpath(*name.split("."))
    if not (folder / "__init__.py").exists():
        raise FileNotFoundError(f"{folder} is not a package of the unpacked wheel")
    module = ModuleType(name)
    module.__path__ = [str(folder)]
    module.__file__ = str(folder / "__init__.py")
    module.__package__ = name
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__spec__.submodule_search_locations = [str(folder)]
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], child, module)


def import_module(name: str, root: Path) -> ModuleType:
    """Import ``name`` from the unpacked wheel at ``root``, its enclosing packages bare."""
    if name in sys.modules:
        return sys.modules[name]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for package in BARE:
        _bare_package(package, root)
    return importlib.import_module(name)


BARE = {
    "llamafactory.model": "its __init__ imports model.loader: trl, peft (model.adapter), the whole model stack",
}
"""Packages registered without running their ``__init__.py``, and why (the only departure from the wheel)."""


def load_moe(root: Path) -> ModuleType:
    """``llamafactory/model/model_utils/moe.py`` (``add_z3_leaf_module``, ``configure_moe``)."""
    return import_module(MOE_MODULE, root)


def load_npu_fused_moe(root: Path) -> ModuleType:
    """``.../kernels/ops/mlp/npu_fused_moe.py``, its ``import torch_npu`` bound to the real torch_npu when
    that imports, else to moeconf's emulator (``moeconf.npu.emulated_torch_npu``): the module keeps the
    object it imported, and the ops read the release rules (``MOECONF_TORCH_NPU_RULES``) at call time."""
    if NPU_MODULE in sys.modules:
        return sys.modules[NPU_MODULE]
    from moeconf.npu import emulated_torch_npu

    try:
        import torch_npu  # noqa: F401

        context: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    except ImportError:
        context = emulated_torch_npu()
    with context:
        return import_module(NPU_MODULE, root)


def root_from_env() -> Path:
    import os

    value = os.environ.get(ROOT_ENV)
    if not value:
        raise RuntimeError(f"{ROOT_ENV} is not set: point it at the unpacked llamafactory-{VERSION} wheel")
    return Path(value)
