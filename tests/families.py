"""Tiny random models of every family lnsdiag supports, built from configs (no hub).

Each family gets 4 blocks so a test can remove the first, a middle and the last one, and
windows shorter than the test sequences so sliding-window masks are exercised.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
_DEC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_MOE_DS = dict(
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
    n_group=1, topk_group=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, first_k_dense_replace=1,
)


def _configs() -> dict[str, object]:
    dec = dict(_DEC)
    return {
        "llama": tf.LlamaConfig(**dec),
        "mistral": tf.MistralConfig(**dec, sliding_window=5),
        "mixtral": tf.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": tf.Qwen2Config(**dec),
        "qwen3": tf.Qwen3Config(**dec, head_dim=8),
        "qwen2_moe": tf.Qwen2MoeConfig(
            **dec, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, decoder_sparse_step=2,
        ),
        "deepseek_v2": tf.DeepseekV2Config(**{**dec, "num_key_value_heads": 4}, q_lora_rank=None, **_MOE_DS),
        "deepseek_v3": tf.DeepseekV3Config(**{**dec, "num_key_value_heads": 4}, q_lora_rank=16, **_MOE_DS),
        "gemma2": tf.Gemma2Config(**dec, head_dim=8, sliding_window=5),
        "gemma3": tf.Gemma3TextConfig(**dec, head_dim=8, sliding_window=5, sliding_window_pattern=2),
        "phi3": tf.Phi3Config(**dec),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0),
        "opt": tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                            num_attention_heads=4, max_position_embeddings=256,
                            word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "bert": tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                              num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=256, pad_token_id=0),
    }


FAMILIES: list[str] = list(_configs())
CAUSAL: list[str] = [f for f in FAMILIES if f != "bert"]


def tiny_config(family: str, **overrides: object):
    config = _configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A float32 CPU model with random weights, deterministic in ``seed``."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    auto = tf.AutoModelForMaskedLM if family == "bert" else tf.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    # Random init leaves some norms at exactly 1/0; perturb them so tests see their effect.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2:][0]:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def peaked_model(family: str, vocab_size: int, scale: float = 12.0) -> torch.nn.Module:
    """:func:`tiny_model` whose next-token distributions are peaked, as a trained model's are (a random
    head gives near-uniform ones, where KL is tiny and top-1 a coin toss between near-ties)."""
    model = tiny_model(family, vocab_size=vocab_size)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        if head is model.get_input_embeddings().weight and hasattr(model, "transformer"):  # GPT-2: tied, ln_f
            model.transformer.ln_f.weight.mul_(scale)
            model.transformer.ln_f.bias.mul_(scale)
        else:
            head.mul_(scale)
    return model


def padded_batch(seed: int = 1, lengths: tuple[int, ...] = (12, 7), side: str = "right"):
    """Token ids and attention mask for sequences of different lengths, padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (n,), generator=gen)
        if side == "right":
            ids[row, :n], mask[row, :n] = tokens, 1
        else:
            ids[row, width - n:], mask[row, width - n:] = tokens, 1
    return ids, mask
