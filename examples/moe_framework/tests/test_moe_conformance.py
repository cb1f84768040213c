"""moeconf's parity checks on the framework's grouped experts path and on its own MoE block."""

from moeconf.pytest_plugin import parity_tests

test_moe_parity = parity_tests(
    backend=["tinyframework.moe:GROUPED", "hf-eager"],  # hf-eager: the blocks as shipped
    registry="tinyframework.moe:ARCHITECTURES",  # the framework's own TinyMoeBlock
    archs=["tinyframework_moe", "mixtral", "qwen3_moe", "olmoe"],
    dtypes=["fp32", "bf16"],
)
