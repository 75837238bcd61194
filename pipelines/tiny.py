"""Tiny random diffusers pipelines of the six supported families, built offline from config.

They exist so that tests, demos and the CLI can run every supported pipeline end to end on a
CPU with no download: no tokenizer and no text encoder are built, and `tiny_inputs` returns
`prompt_embeds` (and the other conditioning tensors each pipeline needs) to pass directly.

Example::

    from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs
    pipe = make_tiny_pipeline("wan")
    video = pipe(**tiny_inputs("wan", pipe, guidance_scale=5.0)).frames
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("flux", "sd3", "sd3.5", "wan", "wan-i2v", "hunyuan-video", "cogvideox", "ltx")
"""Variants `make_tiny_pipeline` builds. `sd3.5` has QK-norm and dual-attention layers;
`wan-i2v` has an image-context cross-attention."""

_TEXT_DIM = 32


def _tiny_kl_vae():
    """The image VAE of the tiny Flux and SD3 pipelines: 2 blocks, so latents are 1/2 the size."""
    import diffusers as d

    return d.AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def make_tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a tiny pipeline of `family` (one of `FAMILIES`) with random weights drawn from `seed`."""
    import diffusers as d

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}; pick one of those.")
    torch.manual_seed(seed)
    if family == "flux":
        transformer = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        )
        vae = _tiny_kl_vae()
        pipe = d.FluxPipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        )
    elif family in ("sd3", "sd3.5"):
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if family == "sd3.5" else {}
        transformer = d.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=_TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=2 * _TEXT_DIM, out_channels=4, pos_embed_max_size=32, **extra,
        )
        vae = _tiny_kl_vae()
        pipe = d.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )
    elif family in ("wan", "wan-i2v"):
        i2v = family == "wan-i2v"
        transformer = d.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=36 if i2v else 16, out_channels=16, text_dim=_TEXT_DIM, freq_dim=32,
            ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
            image_dim=8 if i2v else None, added_kv_proj_dim=24 if i2v else None,
        )
        vae = d.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        scheduler = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
        if i2v:
            # diffusers 0.42 needs the image itself as well as its embedding, so a tiny CLIP
            # vision tower stands in for the real image encoder.
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

            encoder = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, intermediate_size=16, patch_size=16,
            ))
            processor = CLIPImageProcessor(crop_size=32, size=32)
            pipe = d.WanImageToVideoPipeline(
                tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, image_processor=processor,
                image_encoder=encoder, transformer=transformer,
            )
        else:
            pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                 transformer=transformer)
    elif family == "hunyuan-video":
        transformer = d.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=_TEXT_DIM, pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        )
        vae = d.AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=True,
        )
        pipe = d.HunyuanVideoPipeline(
            text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        )
    elif family == "cogvideox":
        transformer = d.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
        )
        vae = d.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )
        pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=d.CogVideoXDDIMScheduler())
    elif family == "ltx":
        transformer = d.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=_TEXT_DIM,
        )
        vae = d.AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False,
        )
        pipe = d.LTXPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def tiny_inputs(
    family: str,
    pipe=None,
    *,
    batch_size: int = 1,
    guidance_scale: float = 1.0,
    text_len: int = 7,
    num_inference_steps: int = 2,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    seed: int = 0,
    padded_text: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for calling a tiny pipeline of `family` without tokenizer or text encoder.

    `guidance_scale > 1` turns classifier-free guidance on (for Flux: true CFG with a negative prompt).
    `padded_text` marks the last text tokens of each prompt as padding where the family takes a text
    mask (HunyuanVideo, LTX). Embeddings are drawn from `seed` so calls are reproducible.
    """
    if family == "wan-i2v":
        text_len = 512  # Wan's processor splits image context from text assuming 512 text tokens
    g = torch.Generator().manual_seed(seed + 1000)
    dtype = pipe.transformer.dtype if pipe is not None else torch.float32

    def emb(n=text_len, dim=_TEXT_DIM):
        return torch.randn(batch_size, n, dim, generator=g).to(dtype)

    def mask(n=text_len):
        m = torch.ones(batch_size, n, dtype=torch.long)
        if padded_text:
            for row in range(batch_size):
                m[row, n - 2 - row:] = 0
        return m

    cfg = guidance_scale > 1.0
    kw: dict[str, Any] = dict(num_inference_steps=num_inference_steps, output_type="pt",
                              generator=torch.Generator().manual_seed(seed))
    if family == "flux":
        kw.update(prompt_embeds=emb(), pooled_prompt_embeds=emb(1)[:, 0], height=height or 16, width=width or 16)
        if cfg:
            kw.update(negative_prompt_embeds=emb(), negative_pooled_prompt_embeds=emb(1)[:, 0],
                      true_cfg_scale=guidance_scale)
        kw["max_sequence_length"] = text_len
    elif family in ("sd3", "sd3.5"):
        kw.update(prompt_embeds=emb(), pooled_prompt_embeds=emb(1, 2 * _TEXT_DIM)[:, 0],
                  guidance_scale=guidance_scale, height=height or 16, width=width or 16)
        if cfg:
            kw.update(negative_prompt_embeds=emb(), negative_pooled_prompt_embeds=emb(1, 2 * _TEXT_DIM)[:, 0])
    elif family in ("wan", "wan-i2v"):
        kw.update(prompt_embeds=emb(), guidance_scale=guidance_scale, height=height or 16,
                  width=width or 16, num_frames=num_frames or 5)
        if cfg:
            kw["negative_prompt_embeds"] = emb()
        if family == "wan-i2v":
            kw["image"] = torch.rand(1, 3, kw["height"], kw["width"], generator=g)
    elif family == "hunyuan-video":
        kw.update(prompt_embeds=emb(), pooled_prompt_embeds=emb(1, 8)[:, 0], prompt_attention_mask=mask(),
                  guidance_scale=6.0, height=height or 16, width=width or 16, num_frames=num_frames or 5)
        if cfg:
            kw.update(negative_prompt_embeds=emb(), negative_pooled_prompt_embeds=emb(1, 8)[:, 0],
                      negative_prompt_attention_mask=mask(), true_cfg_scale=guidance_scale)
    elif family == "cogvideox":
        kw.update(prompt_embeds=emb(16), guidance_scale=guidance_scale, height=height or 16,
                  width=width or 16, num_frames=num_frames or 9, max_sequence_length=16)
        if cfg:
            kw["negative_prompt_embeds"] = emb(16)
    elif family == "ltx":
        kw.update(prompt_embeds=emb(), prompt_attention_mask=mask(), guidance_scale=guidance_scale,
                  height=height or 32, width=width or 32, num_frames=num_frames or 9)
        if cfg:
            kw.update(negative_prompt_embeds=emb(), negative_prompt_attention_mask=mask())
    else:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}; pick one of those.")
    return kw
