"""Pallas attention kernels and their pure-jnp references.

* `block_sparse_attention`: fixed-size block-sparse attention (XAttention-style block masks).
* `cluster_sparse_attention`: variable-size ranges (SVG2 clusters after permutation).
* `quantized_kv_attention`: a query chunk over an int8 / int4 KV cache plus a full-precision window;
  `kv_quantization` owns the cache format it reads (`QuantizedKV`, `quantize_kv`, ...).

Each runs compiled on GPU and in Pallas interpret mode elsewhere (`interpret=None`); `reference` holds the
pure-jnp versions with the same signatures (masked dense attention: same result, dense cost).
`block_sparse_attention_gather` / `cluster_sparse_attention_gather` (`gather_jnp`) are plain-jnp versions
of the two sparse kernels that gather the selected keys and skip the rest, for real sparse timings on CPU.
See docs/kernels.md.
"""

from pallas_kernels._common import ALLOWED_BLOCKS
from pallas_kernels._indices import (
    BlockIndices,
    block_mask_to_indices,
    index_list_to_indices,
    indices_to_block_mask,
    shrink_indices,
    token_mask_to_block_mask,
)
from pallas_kernels._ranges import clusters_to_ranges, fixed_q_ranges
from pallas_kernels.block_sparse import block_sparse_attention, cluster_sparse_attention
from pallas_kernels.gather_jnp import block_sparse_attention_gather, cluster_sparse_attention_gather
from pallas_kernels.kv_quantization import KVQuantConfig, QuantizedKV, dequantize_kv, init_quantized_kv, quantize_kv
from pallas_kernels.quantized_kv import quantized_kv_attention

__all__ = ["ALLOWED_BLOCKS", "KVQuantConfig", "QuantizedKV", "dequantize_kv", "init_quantized_kv", "quantize_kv",
           "BlockIndices", "block_mask_to_indices", "index_list_to_indices", "indices_to_block_mask",
           "shrink_indices", "token_mask_to_block_mask", "clusters_to_ranges", "fixed_q_ranges",
           "block_sparse_attention", "cluster_sparse_attention", "block_sparse_attention_gather",
           "cluster_sparse_attention_gather", "quantized_kv_attention"]
