"""Inside a diffusers pipeline, as users run it: a tiny Stable Diffusion pipeline (random-init
UNet and VAE, classifier-free guidance, a DDIM sampler) with ``tmcore.apply(pipe.unet, "tomesd")``
gives tomesd's own latents bit for bit, and `tmcore.remove` gives the unpatched pipeline's."""

from __future__ import annotations

import copy

import pytest
import torch

import tmcore

diffusers = pytest.importorskip("diffusers")
from tm_diffusers import Diffusers  # noqa: E402


def tiny_pipeline():
    torch.manual_seed(0)
    unet = Diffusers.tiny_models()["unet"]().float()
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sample(pipe):
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 77, 24, generator=gen)
    torch.manual_seed(5)  # tomesd's generator forks the global RNG at the first merging call
    return pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=torch.zeros_like(prompt),
        height=8,
        width=8,
        num_inference_steps=3,
        guidance_scale=7.5,
        output_type="latent",
        generator=gen,
    ).images


def test_pipeline_equals_tomesd_and_remove_restores():
    tomesd = pytest.importorskip("tomesd")
    pipe = tiny_pipeline()
    ref = sample(pipe)
    theirs = copy.deepcopy(pipe)
    tomesd.apply_patch(theirs, ratio=0.5)
    expected = sample(theirs)
    tmcore.apply(pipe.unet, "tomesd", ratio=0.5)
    with tmcore.trace(pipe.unet) as t:
        ours = sample(pipe)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)  # bit for bit here (another CPU may round apart)
    assert not torch.equal(ours, ref)
    assert t.merged_counts[0] == 32  # the last UNet call of the run: 64 tokens merged to 32
    tmcore.remove(pipe.unet)
    assert torch.equal(sample(pipe), ref)
