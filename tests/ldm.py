"""Write a diffusers model folder as one original-layout (LDM) .safetensors checkpoint.

Real single-file Stable Diffusion checkpoints use the original repository's parameter names; this
renames a tiny test model's parameters the same way, so smd's single-file loading is tested on
the layout users actually have.
"""

from __future__ import annotations

from pathlib import Path

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    out = {}
    per = layers_per_block + 1
    for key, value in state.items():
        parts = key.split(".")
        name = None
        if key.startswith("time_embedding.linear_1."):
            name = "time_embed.0." + parts[-1]
        elif key.startswith("add_embedding.linear_1."):  # SDXL: pooled text and size numbers
            name = "label_emb.0.0." + parts[-1]
        elif key.startswith("add_embedding.linear_2."):
            name = "label_emb.0.2." + parts[-1]
        elif key.startswith("time_embedding.linear_2."):
            name = "time_embed.2." + parts[-1]
        elif key.startswith("conv_in."):
            name = "input_blocks.0.0." + parts[-1]
        elif key.startswith("conv_norm_out."):
            name = "out.0." + parts[-1]
        elif key.startswith("conv_out."):
            name = "out.2." + parts[-1]
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                name = f"input_blocks.{per * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = 0 if kind == "resnets" else 1
                rest = _rename(rest, RESNET) if kind == "resnets" else rest
                name = f"input_blocks.{per * i + j + 1}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
            name = f"middle_block.{slot}." + (_rename(rest, RESNET) if kind == "resnets" else rest)
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            if kind == "upsamplers":
                name = f"output_blocks.{per * i + per - 1}.{2 if has_attention else 1}.conv." + parts[-1]
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = 0 if kind == "resnets" else 1
                rest = _rename(rest, RESNET) if kind == "resnets" else rest
                name = f"output_blocks.{per * i + j}.{slot}.{rest}"
        if name is None:
            raise KeyError(f"no LDM name for UNet parameter {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(state: dict, blocks: int) -> dict:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        name = key
        if side in ("encoder", "decoder") and len(parts) > 1:
            if parts[1] == "conv_norm_out":
                name = f"{side}.norm_out.{parts[-1]}"
            elif parts[1] in ("down_blocks", "up_blocks"):
                i = int(parts[2])
                level = i if side == "encoder" else blocks - 1 - i
                tag = "down" if side == "encoder" else "up"
                if parts[3] == "resnets":
                    rest = _rename(".".join(parts[5:]), VAE_RESNET)
                    name = f"{side}.{tag}.{level}.block.{parts[4]}.{rest}"
                else:  # downsamplers / upsamplers
                    name = f"{side}.{tag}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
            elif parts[1] == "mid_block":
                if parts[2] == "resnets":
                    name = f"{side}.mid.block_{int(parts[3]) + 1}." + _rename(".".join(parts[4:]), VAE_RESNET)
                else:
                    name = f"{side}.mid.attn_1." + _rename(".".join(parts[4:]), VAE_ATTENTION)
                    if value.ndim == 2:
                        value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out["first_stage_model." + name] = value
    return out


OPEN_CLIP = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """SDXL's second text encoder in OpenCLIP's layout: fused q/k/v, a transposed projection."""
    out = {}
    fused: dict[str, dict[str, object]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name.split(".")[-1]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif name.startswith("encoder.layers."):
            parts = name.split(".")
            block, rest = f"{prefix}transformer.resblocks.{parts[2]}.", ".".join(parts[3:])
            if parts[3] == "self_attn" and parts[4] in ("q_proj", "k_proj", "v_proj"):
                fused.setdefault(f"{block}attn.in_proj_{parts[5]}", {})[parts[4]] = value
            else:
                out[block + _rename(rest, OPEN_CLIP)] = value
        elif name != "embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for text encoder parameter {key}")
    import torch

    for name, parts in fused.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def write_single_file(model_folder: Path, target: Path) -> Path:
    """Save a tiny diffusers SD or SDXL folder as an LDM-layout .safetensors file."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    xl = (Path(model_folder) / "text_encoder_2").is_dir()
    pipe = DiffusionPipeline.from_pretrained(str(model_folder), **({} if xl else {"safety_checker": None}))
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    first = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state[first + key] = value
    if xl:
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target
