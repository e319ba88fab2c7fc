"""Triton kernels for `kiln::paged_attention` (CUDA, or the CPU under TRITON_INTERPRET=1).

One module per kernel: `kv_write` stores new keys/values into the paged cache, `prefill`
attends tiles of packed queries, `decode` launches split-K attention for one token per program
(`decode_kernel`) and the merge of its splits (`decode_merge`), and `attention` dispatches among
them. `gemv` launches the small-M linear (`gemv_kernel`) with the choices of `gemv_config`.
Importing this package imports triton.
"""

from kiln.kernels.triton.attention import paged_attention_triton, unsupported_reason

__all__ = ["paged_attention_triton", "unsupported_reason"]
