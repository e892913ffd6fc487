"""Prompt to video on a device mesh (8 virtual CPU devices, tests/conftest.py): the umT5 and VAE sharding rules
cover every parameter, and the tiny T2V pipeline (tests/fixtures/wan_pipeline) run with its weights sharded
and the denoising sequence-parallel gives the one-device prompt embeddings, latents and decoded frames;
`vidaccel generate --mesh` and its errors."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.cli import main as cli_main
from experiments.generate import method_denoiser
from experiments.video_files import read_video
from models.umt5 import abstract_umt5, umt5_xxl
from models.umt5.sharding import UMT5_RULES
from models.wan_pipeline import decode, encode_prompt, generate, load_pipeline
from models.wan_vae import abstract_wan_vae, wan21_vae
from models.wan_vae.sharding import VAE_RULES
from vidaccel.parallel import make_mesh, param_specs

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; see tests/conftest.py")

FIX = Path(__file__).parent / "fixtures" / "wan_pipeline"
PROMPTS, NEGATIVE = ["a red ball rolls on the beach", "two birds fly"], ["blurry", ""]
# one latent frame (the VAE compiles only its first-chunk step): 6 tokens, 2 heads
RUN = dict(frames=1, height=32, width=48, steps=2, guidance=5.0, output="float", progress=False)


def _specs(module, rules, mesh) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(param_specs(nnx.state(module), rules, mesh),
                                                is_leaf=lambda x: isinstance(x, P))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): s for p, s in flat}


def test_rules_cover_every_parameter_at_full_size():
    """Strict rules name every parameter of umT5-xxl and the Wan2.1 VAE (abstract: no memory); the large
    matrices are split over (fsdp, seq) and what stays whole is under 0.5% of either model."""
    mesh = make_mesh("fsdp=4,seq=2")
    split = ("fsdp", "seq")
    for module, rules, big in ((abstract_umt5(umt5_xxl()), UMT5_RULES, ("embed", "layers/wi_0", "layers/o")),
                               (abstract_wan_vae(wan21_vae()), VAE_RULES,
                                ("decoder/mid_block/resnets/0/conv1/kernel",
                                 "decoder/up_blocks/0/upsamplers/0/resample/kernel",
                                 "encoder/mid_block/attentions/0/to_qkv/kernel"))):
        specs = _specs(module, rules, mesh)
        shapes = {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): leaf.shape
                  for p, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]}
        assert all(split in tuple(specs[name]) for name in big), {name: specs[name] for name in big}
        whole = sum(math.prod(shapes[n]) for n, s in specs.items() if all(e is None for e in s))
        assert 0 < whole < 0.005 * sum(math.prod(s) for s in shapes.values())
    assert _specs(abstract_umt5(umt5_xxl()), UMT5_RULES, mesh)["layers/relative_bias"] == P(None, None, None)


@pytest.fixture(scope="module")
def pipe_and_ref():
    pipe = load_pipeline(FIX / "t2v", dtype="float32")
    ref = generate(pipe, PROMPTS, NEGATIVE, **RUN)
    return pipe, ref, np.asarray(encode_prompt(pipe, PROMPTS + NEGATIVE))


@pytest.mark.parametrize(("spec", "devices", "attention"), [("seq=2", 2, "ulysses"),
                                                             ("data=2,fsdp=2,seq=2", 8, "ring")])
def test_generate_on_mesh_equals_one_device(pipe_and_ref, spec, devices, attention):
    """CFG 5, 2 prompts. The sharded parts equal one device within 1e-5: umT5's prompt embeddings, and the VAE
    decoding the one-device latents (placed as the sharded run leaves them: split by batch over fsdp on the
    CFG-parallel mesh). The whole run gives the one-device latents within 1e-5 relative L2 (1e-4 absolute on
    latents of magnitude ~4: one transformer call with tokens split differs by ~2e-6 relative, which CFG 5
    amplifies), the same frames within 1e-4 on [0, 1] and the same work."""
    pipe, ref, ref_context = pipe_and_ref
    mesh = make_mesh(spec, devices=jax.devices()[:devices])
    placed = pipe.on_mesh(mesh)
    assert placed is pipe.on_mesh(mesh) and placed.mesh is mesh
    q = placed.text_encoder.layers.q[...]
    assert q.addressable_shards[0].data.shape[1] < q.shape[1]           # umT5 weights really split
    conv = placed.vae.decoder.mid_block.resnets[0].conv1.kernel[...]
    assert conv.addressable_shards[0].data.shape[3] < conv.shape[3]     # and the VAE's
    np.testing.assert_allclose(np.asarray(encode_prompt(placed, PROMPTS + NEGATIVE)), ref_context, atol=1e-5,
                               rtol=0)
    out = generate(pipe, PROMPTS, NEGATIVE, mesh=mesh, attention=attention, **RUN)
    assert out.latents.sharding.spec == (P(None) if spec == "seq=2" else P("fsdp"))
    same = jax.device_put(ref.latents, out.latents.sharding)
    np.testing.assert_allclose(np.asarray(decode(placed, same)), ref.frames, atol=1e-5, rtol=0)
    got, want = np.asarray(out.latents), np.asarray(ref.latents)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.frames, ref.frames, atol=1e-4, rtol=0)
    assert out.work == ref.work


@pytest.mark.filterwarnings("ignore:no published TeaCache coefficients")
def test_generate_cli_on_mesh(tmp_path, capsys):
    out = tmp_path / "video.gif"
    rc = cli_main(["generate", "--model", str(FIX / "t2v"), "--prompt", "a red ball rolls", "--frames", "1",
                   "--size", "48x32", "--steps", "3", "--guidance", "1", "--method", "teacache", "--threshold",
                   "0.5", "--dtype", "float32", "--mesh", "fsdp=4,seq=2", "--attention", "ring", "--out", str(out),
                   "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert read_video(out).shape == (1, 32, 48, 3)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "seq": 2} and report["attention"] == "ring"
    assert report["work"]["calls"] == 3 and report["work"]["block_passes"] <= 3


def test_mesh_errors(pipe_and_ref, tmp_path, capsys):
    pipe = pipe_and_ref[0]
    base = ["generate", "--model", str(FIX / "t2v"), "--prompt", "x", "--frames", "5", "--size", "48x32",
            "--steps", "1", "--dtype", "float32", "--out", str(tmp_path / "v.gif")]
    for flags, message in ((["--mesh", "fsdp=2,seq=2"], "asks for 4 devices (data*fsdp*seq) but there are 8; "
                                                         "allowed shapes multiply to 8"),
                           (["--attention", "ring"], "--attention chooses the sequence-parallel attention of a "
                                                     "mesh run; give --mesh too")):
        assert cli_main(base + flags) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass mesh= too"):
        generate(pipe, "x", attention="ring", **RUN)
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        generate(pipe, "x", mesh="tensor=8", **RUN)
    placed = pipe.on_mesh(make_mesh("data=2,fsdp=2,seq=2"))
    with pytest.raises(ValueError, match="haste-svg2 on a mesh runs head-parallel under Ulysses"):
        method_denoiser(placed, "haste-svg2", attention="ring")
    df = load_pipeline(FIX / "df", dtype="float32")
    with pytest.raises(ValueError, match=r"execution='chunks' \(FlowCache, MotionCache\) cannot run on a mesh"):
        generate(df, "x", mesh="data=2,seq=4", execution="chunks", **RUN)
    with pytest.raises(ValueError, match=r"splits the 6 tokens into 4 equal blocks .* allowed seq sizes for 6 "):
        generate(pipe, "x", mesh="fsdp=2,seq=4", **RUN)
