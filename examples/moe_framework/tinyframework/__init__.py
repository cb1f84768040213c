"""tinyframework: a stand-in for a training framework that ships its own MoE code.

- ``tinyframework.modeling``: its own Mixtral-style MoE block (``TinyMoeBlock``), the way a framework or
  a remote-code model ships a modeling file;
- ``tinyframework.kernels``: its grouped-matmul experts path (permute → one GEMM per expert group →
  SwiGLU → GEMM → weighted scatter), which it patches into transformers' MoE blocks;
- ``tinyframework.training``: its ZeRO-3 leaf function and its MoE configure function;
- ``tinyframework.moe``: what it hands to moeconf: backends and architecture entries.
"""

__version__ = "0.1.0"
