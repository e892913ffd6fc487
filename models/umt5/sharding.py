"""How the umT5 encoder lays out on a (data, fsdp, seq) mesh (`vidaccel.parallel`).

`UMT5_RULES` names every parameter. umT5-xxl is 5.7B parameters (10.6 GB in bf16), as large as the 1.3B
transformer several times over, so its matrices are FSDP-sharded over PARAM_AXES like the transformer's:
the stacked layer matrices over their input dim (the layer axis left whole, so the layer scan slices
locally), the 256k x 4096 embedding over d_model (so the token lookup gathers locally, each device
returning its slice of every token's vector). Norm gains and the per-layer relative position bias are
replicated. Activations are not constrained: XLA splits them by batch where the batch follows the inputs.
"""

from __future__ import annotations

from vidaccel.parallel import FSDP

UMT5_RULES = (
    (r"embed", (None, FSDP)),
    (r"layers/(q|k|v|o|wi_0|wi_1|wo)", (None, FSDP, None)),
    (r"layers/(attn_norm|ffn_norm)", (None, None)),
    (r"layers/relative_bias", (None, None, None)),
    (r"final_norm", (None,)),
)

__all__ = ["UMT5_RULES"]
