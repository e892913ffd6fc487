"""The models vidaccel accelerates: Wan2.1 / SkyReels-V2 transformers (`models.wan`), the AR chunk runtime
(`models.ar`) and the embedded shapes world with its trained tiny models (`models.shapes`).

The names a notebook needs, in one import:

    from models import load_shapes_model, generate_t2v, load_transformer, wan_denoiser, rollout, RolloutConfig
"""

from models.ar.diffusion_forcing import df_sample
from models.ar.rollout import RolloutConfig, chunk_denoiser, kv_cache_bytes, rollout
from models.shapes.pretrained import generate_t2v, latent_noise, load_shapes_model
from models.shapes.prompts import sample_prompts
from models.wan.config import WanConfig, preset
from models.wan.denoiser import wan_denoiser
from models.wan.loader import load_transformer
from models.wan.transformer import WanTransformer

__all__ = ["RolloutConfig", "WanConfig", "WanTransformer", "chunk_denoiser", "df_sample", "generate_t2v",
           "kv_cache_bytes", "latent_noise", "load_shapes_model", "load_transformer", "preset", "rollout",
           "sample_prompts", "wan_denoiser"]
