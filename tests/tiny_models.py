"""Tiny random mlx-lm models saved to disk with a tokenizer, for engine tests.

Three architectures whose position handling differs: llama (GQA, rotate-half
RoPE), qwen2 (q/k/v bias, large rope_theta), phi3 (fused qkv, partial rotary).
The tokenizer is a byte-level BPE trained offline with `tokenizers`, with a
ChatML template, so the whole `load_model` path runs as for a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find code locker red blue green name is colour"
).split()
SPECIAL = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "phi3": dict(
        model_type="phi3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def write_tokenizer(folder: Path) -> int:
    """A small byte-level BPE (as real chat models use), trained offline; returns vocab size.

    Byte-level BPE survives transformers' per-architecture tokenizer classes
    (qwen2 swaps in Qwen2Tokenizer, which re-does the pre-tokenization).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([" ".join(WORDS)] * 5 + [" ".join(str(i) for i in range(100))], trainer)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return int(tk.get_vocab_size())


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Build, save and return a tiny random `arch` model folder (`overrides` change the config)."""
    from mlx_lm.utils import _get_classes

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    config = dict(ARCHS[arch], vocab_size=vocab, eos_token_id=3, bos_token_id=1, pad_token_id=0)
    config.update(overrides)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Larger-than-default init so attention is not uniform and logits differ.
    params = tree_flatten(model.parameters())
    weights = {k: (v * 3.0 if v.ndim == 2 else v) for k, v in params}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


_VOCAB_KEYS = ("vocab_size", "num_vocab", "n_vocab")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer")
# mlx-lm's test configs use widths up to 1024: a tiny model needs 128 at most.
_WIDTH_KEYS = (
    "hidden_size",
    "d_model",
    "model_dim",
    "n_embd",
    "intermediate_size",
    "ffn_hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "mlp_hidden_size",
)


def zoo_config(arch: str, vocab: int, n_layers: int | None = 2) -> dict[str, object]:
    """The zoo config of `arch` with the tokenizer's vocab and (if given) `n_layers` layers."""
    from zoo_configs import ZOO

    config = json.loads(json.dumps(ZOO[arch]))
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for k in _VOCAB_KEYS:
            if k in cfg or k == "vocab_size":
                cfg[k] = vocab
        for k in _WIDTH_KEYS:
            if isinstance(cfg.get(k), int) and cfg[k] > 256:
                cfg[k] = 128
        for sub in ("ffn_config",):
            if isinstance(cfg.get(sub), dict):
                cfg[sub] = {k: (128 if k in _WIDTH_KEYS and v > 256 else v) for k, v in cfg[sub].items()}
        if n_layers is not None:
            for k in _LAYER_KEYS:
                if (
                    isinstance(cfg.get(k), int)
                    and cfg[k] > n_layers
                    and not any(isinstance(v, list) and len(v) == cfg[k] for v in cfg.values())
                ):
                    cfg[k] = n_layers
    config.update(eos_token_id=3, bos_token_id=1, pad_token_id=0)
    return config


class QuantizeError(RuntimeError):
    """mlx-lm's `quantize_model` refused this architecture."""


def make_zoo_model(folder: Path, arch: str, seed: int = 0, bits: int | None = None) -> Path:
    """Build and save a tiny random model of any zoo architecture (`bits`: quantize it).

    Tries the config shrunk to 2 layers first and keeps the module's own layer
    count when the smaller one does not build or run (layer patterns).
    """
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    last: Exception | None = None
    for n_layers in (2, None):
        config = zoo_config(arch, vocab, n_layers)
        try:
            model_cls, args_cls = _get_classes(config)
            mx.random.seed(seed)
            model = model_cls(args_cls.from_dict(config))
            n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
            if n_params > 20_000_000:
                raise ValueError(f"{arch}: {n_params} parameters is not a tiny model; shrink its zoo config")
            model(mx.array([[5, 6, 7]]), cache=make_prompt_cache(model))
            break
        except Exception as exc:  # noqa: BLE001 - the next layer count may build
            last = exc
    else:
        assert last is not None
        raise last
    params = tree_flatten(model.parameters())
    weights = {k: (v * 3.0 if v.ndim == 2 and mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params}
    model.load_weights(list(weights.items()))
    if bits is not None:
        from mlx_lm.utils import quantize_model

        try:
            model, config = quantize_model(model, config, group_size=32, bits=bits)
        except Exception as exc:  # noqa: BLE001 - mlx-lm's own quantizer refused: reported as its limit
            raise QuantizeError(f"mlx-lm cannot quantize {arch} to {bits} bits: {type(exc).__name__}: {exc}") from exc
        weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
