"""The LLaMA-Factory client runner's pieces (clients/llamafactory), without the wheel: source reading on a
stand-in function, bare-package import on a stand-in package, the NPU backend's refusal. The run on the
real wheel is ``nox -s client_llamafactory``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from clients.llamafactory import loader, source

FRAMEWORK = """
def add_leaf(model):
    model_type = getattr(model.config, "model_type", None)
    text_model_type = None
    if model_type == "mixtral":
        mark(model, ["MixtralSparseMoeBlock"])
    if model_type == "qwen3_moe" or text_model_type == "qwen3_moe":
        mark(model, ["Qwen3MoeSparseMoeBlock"])


def configure(config, model_args, is_trainable):
    model_type = config.model_type
    text_config = getattr(config, "text_config", None)
    if model_type in ["dbrx", "mixtral"]:
        setattr(config, "output_router_logits", True)
    if text_config and getattr(text_config, "model_type", None) in ["glm4v_moe_text"]:
        setattr(text_config, "output_router_logits", True)
    if model_type in ["mixtral"]:
        setattr(config, "router_aux_loss_coef", model_args.moe_aux_loss_coef)
"""


@pytest.fixture
def fake_wheel(tmp_path: Path) -> Path:
    """A folder shaped like the unpacked wheel: ``llamafactory/model/__init__.py`` raises on import."""
    pkg = tmp_path / "llamafactory"
    (pkg / "model" / "model_utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VERSION = 'fake'\n")
    (pkg / "model" / "__init__.py").write_text("raise ImportError('the training stack')\n")
    (pkg / "model" / "model_utils" / "__init__.py").write_text("")
    (pkg / "model" / "model_utils" / "moe.py").write_text(textwrap.dedent(FRAMEWORK))
    yield tmp_path
    for name in [n for n in sys.modules if n == "llamafactory" or n.startswith("llamafactory.")]:
        del sys.modules[name]
    sys.path.remove(str(tmp_path))


def test_bare_package_skips_only_the_heavy_init(fake_wheel: Path) -> None:
    moe = loader.load_moe(fake_wheel)
    assert sys.modules["llamafactory"].VERSION == "fake"  # the light __init__ ran
    assert sys.modules["llamafactory.model"].__path__ == [str(fake_wheel / "llamafactory" / "model")]
    assert callable(moe.add_leaf) and callable(moe.configure)


def test_handled_types_split_own_and_text(fake_wheel: Path) -> None:
    moe = loader.load_moe(fake_wheel)
    assert source.handled(moe.add_leaf) == ({"mixtral", "qwen3_moe"}, {"qwen3_moe"})
    assert source.handled(moe.configure) == ({"dbrx", "mixtral"}, {"glm4v_moe_text"})


def test_evidence_points_at_the_branch_and_its_statements(fake_wheel: Path) -> None:
    moe = loader.load_moe(fake_wheel)
    path = "llamafactory/model/model_utils/moe.py"
    assert source.evidence(moe.add_leaf, fake_wheel, "mixtral", None) == [
        f"{path}:5: branch for mixtral",
        f'{path}:6: mark(model, ["MixtralSparseMoeBlock"])',
    ]
    assert source.evidence(moe.configure, fake_wheel, "glm4v_moe", "glm4v_moe_text") == [
        f"{path}:16: branch for text glm4v_moe_text",
        f'{path}:17: setattr(text_config, "output_router_logits", True)',
    ]
    assert source.branches_setting(moe.configure, fake_wheel, "moe_aux_loss_coef") == [
        f"{path}:18: moe_aux_loss_coef set only for mixtral"
    ]


def test_root_from_env_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loader.ROOT_ENV, raising=False)
    with pytest.raises(RuntimeError, match=loader.ROOT_ENV):
        loader.root_from_env()


def test_summary_lists_each_finding_with_its_lines() -> None:
    from clients.llamafactory.run import summary

    report = {
        "llamafactory": "0.9.5", "transformers": "5.24.0", "deepspeed": "0.19.8", "torch": "2.13.0",
        "torch_npu_rules": "7.0", "root": "/w", "targets": {"leaf": ["deepseek_v2"], "configure": [], "npu_fused_moe": []},
        "records": [{"part": "leaf", "status": "fail"}],
        "findings": [{"part": "leaf", "arch": "deepseek_v2", "check": "leaf_marks", "status": "fail",
                      "dtype": "fp32", "case": "tiny-model", "message": "raised\nexpected: X",
                      "llamafactory": ["moe.py:59: x"]}],
    }  # fmt: skip
    text = summary(report)
    assert "**1 finding(s)**" in text and "1 distinct" in text
    assert (
        "**deepseek_v2** `leaf` (fail; checks: leaf_marks; fp32/tiny-model): raised" in text
        and "moeconf: expected: X" in text
        and "`moe.py:59: x`" in text
    )
