"""Small configs of every mlx-lm text architecture module, for the model zoo.

Most come from mlx-lm's own `tests/test_models.py` (extracted once with
`ast.literal_eval`, kept as data in `fixtures/zoo_configs.json`), the rest
were written from each module's `ModelArgs` below. `zoo_config(arch)` shrinks
them further (2 layers where the layer pattern allows) and points
`vocab_size` at the tiny tokenizer; keys are module names of `mlx_lm.models`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ZOO: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "fixtures" / "zoo_configs.json").read_text())

# Shrunk by hand: configs that were module defaults (billions of parameters)
# or whose windows were longer than a test prompt, so the window never slid.
ZOO["cohere"] = dict(
    model_type="cohere",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ZOO["qwen"] = dict(
    model_type="qwen", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16, intermediate_size=256
)
ZOO["falcon_h1"] = dict(
    model_type="falcon_h1",
    hidden_size=64,
    head_dim=16,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    mamba_d_head=16,
    mamba_d_ssm=64,
    mamba_d_state=16,
    mamba_n_heads=4,
    mamba_chunk_size=16,
)
ZOO["cohere2"].update(
    hidden_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=4,
    sliding_window=8,
    sliding_window_pattern=2,
)
ZOO["gpt_neox"].update(hidden_size=64, num_attention_heads=4, intermediate_size=128)
ZOO["phi3"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
ZOO["gemma3_text"].update(sliding_window=8)
ZOO["recurrent_gemma"].update(attention_window_size=8)
ZOO["gpt_oss"].update(sliding_window=8, hidden_size=64, intermediate_size=128)
ZOO["olmo3"].update(sliding_window=8)
ZOO["mimo_v2_flash"].update(sliding_window_size=8)
ZOO["step3p5"].update(sliding_window=8)
ZOO["gemma3n"]["text_config"]["sliding_window"] = 8
# Shared KV: the last layers read an earlier layer's cache (mlx-lm's kv-shared test config).
ZOO["gemma4_text"] = dict(
    model_type="gemma4_text",
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=128,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    rms_norm_eps=1e-6,
    num_key_value_heads=1,
    num_kv_shared_layers=2,
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=300,
    sliding_window=8,
    sliding_window_pattern=3,
    final_logit_softcapping=30.0,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    rope_parameters={
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_theta": 10000.0},
    },
)
ZOO["dots1"]["max_position_embeddings"] = 4096
ZOO["mamba2"]["time_step_limit"] = [0.01, 10.0]
ZOO["phi"]["num_key_value_heads"] = 4
ZOO["lfm2"]["layer_types"] = ["full_attention", "conv", "full_attention", "conv"]
ZOO["granitemoehybrid"].update(mamba_d_state=16, mamba_n_heads=16, mamba_d_head=16)
# Written from each module's ModelArgs where the shrunk test config did not load.
ZOO["exaone4"]["layer_types"] = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
ZOO["mamba2"]["num_heads"] = 16
ZOO["glm_moe_dsa"]["q_lora_rank"] = 32
ZOO["mellum"]["rope_parameters"] = {
    "sliding_attention": {"rope_theta": 10000.0},
    "full_attention": {"rope_theta": 1000000.0},
}
ZOO["spark2_5"]["rope_parameters"] = dict(ZOO["mellum"]["rope_parameters"])
ZOO["minicpm3"]["rope_scaling"] = {
    "original_max_position_embeddings": 4096,
    "short_factor": [1.0] * 4,
    "long_factor": [1.0] * 4,
}
_LLAMA4_ROPE = {"rope_theta": 10000.0, "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 4096}
ZOO["ministral3"]["rope_parameters"] = dict(_LLAMA4_ROPE)
ZOO["mistral3"]["text_config"]["rope_parameters"] = dict(_LLAMA4_ROPE)
ZOO["mistral4"]["rope_parameters"] = dict(
    _LLAMA4_ROPE, rope_type="yarn", factor=1.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
)
ZOO["kimi_k3"] = dict(model_type="kimi_k3", text_config=dict(ZOO["kimi_linear"], model_type="kimi_linear"))
ZOO["muse_spark"] = dict(
    model_type="muse_spark",
    text_config=dict(
        model_type="muse_spark_text",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        post_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0},
        layer_rope_theta=[10000.0, 0.0],
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        final_logit_softcapping=30.0,
        output_multiplier=1.0,
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_hidden_size=64,
        moe_intermediate_size=64,
    ),
)
ZOO["kimi_k3"]["text_config"]["linear_attn_config"] = {
    "head_dim": 32,
    "kda_layers": [1],
    "num_heads": 8,
    "short_conv_kernel_size": 4,
}
ZOO["kimi_k3"]["text_config"].update(num_experts_per_token=1)
ZOO["gpt2"].update(n_embd=64, n_head=4)
ZOO["dbrx"]["attn_config"]["clip_qkv"] = 8.0  # transformers' config wants a number, not True
ZOO["nanochat"].update(hidden_size=128, num_attention_heads=4, num_key_value_heads=4)
ZOO["jamba"].update(mamba_expand=2, mamba_d_state=16)
# A soft cap of 1.0 squashes every logit to within 1e-6 of 1.0: greedy picks would hinge on
# float summation order. Real models cap at 30.
ZOO["gemma3n"]["text_config"]["final_logit_softcapping"] = 30.0
ZOO["recurrent_gemma"]["logits_soft_cap"] = 30.0
