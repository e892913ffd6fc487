"""How the Wan transformer lays out on a (data, fsdp, seq) mesh (`vidaccel.parallel`).

`WAN_RULES` names every parameter: the big matrices are FSDP-sharded over PARAM_AXES (their input dim, the
layer axis left whole so the layer scan slices locally), norms, biases, modulation tables and the small
embedding/head matrices are replicated. `parallel_wan_denoiser` is `wan_denoiser` with sequence-parallel
self-attention and the token activations pinned to the `seq` axis right after the embedding.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from models.wan.denoiser import wan_denoiser
from models.wan.transformer import Embedded, WanTransformer
from vidaccel.parallel import FSDP, UlyssesHeads, constrain_batch, constrain_tokens, seq_parallel_attention
from vidaccel.sparse_attention import Policy, sparse_attention
from vidaccel.transforms import Denoiser, Stages, staged_apply

WAN_RULES = (
    # stacked blocks: (L, din, dout) matrices over din; everything per-channel replicated
    (r"layers/(attn1|attn2)/to_(q|k|v|out)/kernel", (None, FSDP, None)),
    (r"layers/ffn/proj_(in|out)/kernel", (None, FSDP, None)),
    (r"layers/(attn1|attn2)/(to_(q|k|v|out)/bias|norm_(q|k)/weight)", (None, None)),
    (r"layers/ffn/proj_(in|out)/bias", (None, None)),
    (r"layers/norm2/(weight|bias)", (None, None)),
    (r"layers/scale_shift_table", (None, None, None, None)),
    # embeddings: the text / time matrices are D x D-sized (21M and 157M at 14B): shard; the rest is small
    (r"text_embedder/linear_(1|2)/kernel", (FSDP, None)),
    (r"time_embedder/(linear_2|time_proj)/kernel", (FSDP, None)),
    (r"time_embedder/linear_1/kernel", (None, None)),
    (r"(text_embedder|time_embedder)/\w+/bias", (None,)),
    (r"patch_embedding/kernel", (None, None, None, None, None)),
    (r"patch_embedding/bias", (None,)),
    (r"proj_out/kernel", (None, None)),
    (r"proj_out/bias", (None,)),
    (r"scale_shift_table", (None, None, None)),
)


def constrain_embedded(emb: Embedded, mesh: Mesh) -> Embedded:
    """`emb` with tokens, positions and frame rows split by tokens over `seq`, per-sample tables by batch."""
    return emb.replace(tokens=constrain_tokens(emb.tokens, mesh), positions=constrain_tokens(emb.positions, mesh),
                       frame_index=constrain_tokens(emb.frame_index, mesh), e=constrain_batch(emb.e, mesh),
                       e0=constrain_batch(emb.e0, mesh), context=constrain_batch(emb.context, mesh))


def parallel_wan_denoiser(model: WanTransformer, mesh: Mesh, *, attention: str = "ulysses", **attention_kw) -> Denoiser:
    """The dense Wan denoiser on `mesh`: self-attention by "ulysses" or "ring" (`attention_kw` go to
    `vidaccel.parallel.ulysses_attention` / `ring_attention`, e.g. `inner=`, `q_chunk=`), token activations
    split over `seq`. Wrap it with methods as the single-device denoiser."""
    den = wan_denoiser(model, attention=seq_parallel_attention(attention, mesh, **attention_kw))
    st = den.stages

    def embed(params, state, x, t, context):
        emb, state = st.embed(params, state, x, t, context)
        return constrain_embedded(emb, mesh), state

    stages = Stages(embed, st.blocks, st.head)
    return dataclasses.replace(den, stages=stages, apply=staged_apply(stages), name=f"{attention}({den.name})")


def parallel_sparse_denoiser(model: WanTransformer, mesh: Mesh, policy: Policy, *, axis: str = "seq") -> Denoiser:
    """The Wan denoiser on `mesh` with self-attention run by a sparse `policy` head-parallel under Ulysses:
    `sparse_attention(parallel_wan_denoiser(model, mesh), policy, wrap=UlyssesHeads(mesh, axis))`. Each
    device predicts and applies the masks of its heads (see docs/parallel.md)."""
    return sparse_attention(parallel_wan_denoiser(model, mesh, attention="ulysses", axis=axis), policy,
                            wrap=UlyssesHeads(mesh, axis))


__all__ = ["WAN_RULES", "constrain_embedded", "parallel_sparse_denoiser", "parallel_wan_denoiser"]
