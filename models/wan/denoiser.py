"""The dense Wan baseline as a `Denoiser`: every call runs the whole transformer.

    den = wan_denoiser(model)      # then wrap it with methods (teacache, sparse_attention, ...)
"""

from __future__ import annotations

from flax import nnx, struct

from models.wan.transformer import WanTransformer
from vidaccel.transforms import Denoiser, DenoiseSpec, Stages, Work, add_work, staged_apply


@struct.dataclass
class DenseState:
    work: Work


def wan_denoiser(model: WanTransformer, *, attention=None) -> Denoiser:
    """The dense baseline: every call runs the whole model. `attention` replaces dense self-attention."""
    if not isinstance(model, WanTransformer):
        raise TypeError(f"wan_denoiser needs a WanTransformer, got {type(model).__name__}")
    graphdef, params = nnx.split(model)
    num_layers = model.cfg.num_layers

    def init(spec: DenoiseSpec) -> DenseState:
        return DenseState(Work.zero())

    def embed(params, state, x, t, context):
        return nnx.merge(graphdef, params).embed(x, t, context), add_work(state, calls=1)

    def blocks(params, state: DenseState, emb):
        tokens, _ = nnx.merge(graphdef, params).blocks(emb, attention=attention)
        return tokens, add_work(state, block_passes=1, token_layers=emb.tokens.shape[1] * num_layers)

    def head(params, tokens, emb):
        return nnx.merge(graphdef, params).head(tokens, emb)

    stages = Stages(embed, blocks, head)
    return Denoiser(init=init, apply=staged_apply(stages), graphdef=graphdef, params=params, name="dense",
                    stages=stages, config=model.cfg)
