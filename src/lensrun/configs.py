"""What a Lens checkpoint looks like: the published configs (full size), the tiny test configs, and the tensor
names and shapes each component's weights must have (meta tensors: no memory, no weights needed).

The loader checks checkpoints against these, the planner sizes components from them, and the random-checkpoint
writer writes them; none of them needs the others.
"""

from __future__ import annotations

import torch

LENS_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

FULL_TRANSFORMER_CONFIG = {
    "patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": 48, "attention_head_dim": 64,
    "num_attention_heads": 24, "inner_dim": 1536, "enc_hidden_dim": 2880, "axes_dims_rope": [8, 28, 28],
    "gate_mlp": True, "rms_norm": True, "multi_layer_encoder_feature": True, "selected_layer_index": [5, 11, 17, 23],
}  # fmt: skip
TINY_TRANSFORMER_CONFIG = {
    **FULL_TRANSFORMER_CONFIG, "num_layers": 2, "num_attention_heads": 2, "inner_dim": 128, "enc_hidden_dim": 64,
    "selected_layer_index": [1, 3],
}  # fmt: skip

_ROPE = {
    "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
    "original_max_position_embeddings": 4096, "truncate": False,
}  # fmt: skip
FULL_TEXT_ENCODER_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
    "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "hidden_act": "silu",
    "swiglu_limit": 7.0, "attention_bias": True, "attention_dropout": 0.0, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "rms_norm_eps": 1e-05, "vocab_size": 201088,
    "max_position_embeddings": 131072, "initial_context_length": 4096, "rope_parameters": _ROPE,
    "eos_token_id": 200002, "pad_token_id": 199999, "bos_token_id": None, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.9, "dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    },
}  # fmt: skip
TINY_TEXT_ENCODER_CONFIG = {
    **FULL_TEXT_ENCODER_CONFIG, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "num_local_experts": 4,
    "num_experts_per_tok": 2, "experts_per_token": 2, "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "vocab_size": 1024, "eos_token_id": 2,
    "pad_token_id": 1,
}  # fmt: skip

FULL_VAE_CONFIG = {
    "_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "out_channels": 3,
    "latent_channels": 32, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
    "patch_size": [2, 2], "sample_size": 1024, "use_post_quant_conv": True, "use_quant_conv": True,
}  # fmt: skip
TINY_VAE_CONFIG = {**FULL_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8}

MODEL_INDEX = {
    "_class_name": "LensPipeline",
    "_diffusers_version": "0.37.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LensGptOssEncoder"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "LensTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def transformer_meta_state(config: dict) -> dict[str, torch.Tensor]:
    from lensrun.models.transformer_lens import LensTransformer2DModel

    with torch.device("meta"):
        return LensTransformer2DModel(**config).state_dict()


def text_encoder_meta_state(config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the HF GPT-OSS checkpoint (all layers, final norm, lm_head), with ``model.`` prefix."""
    from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config

    cfg = gpt_oss_config(config)
    with torch.device("meta"):
        enc = LensTextEncoder(cfg, (cfg.num_hidden_layers - 1,))
        state = {"model." + k: v for k, v in enc.state_dict().items()}
        state["model.norm.weight"] = torch.empty(cfg.hidden_size, dtype=torch.bfloat16)
        state["lm_head.weight"] = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16)
    return state


def vae_init_kwargs(config: dict) -> dict:
    """AutoencoderKLFlux2 constructor arguments from a vae/config.json (``force_upcast`` is not one of them)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "force_upcast"}


def vae_meta_state(config: dict) -> dict[str, torch.Tensor]:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

    with torch.device("meta"):
        return AutoencoderKLFlux2(**vae_init_kwargs(config)).state_dict()
