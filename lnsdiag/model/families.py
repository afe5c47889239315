"""What lnsdiag knows about particular model families, and nothing else: one table per question.

lnsdiag finds a model's parts by looking (the block stack, its norms, how it normalises, what
a block returns); what cannot be found by looking is named here, and nowhere else. **A new
family = one entry here**: its names added to the tables below that it needs (a Llama-like
model needs none). Each table, what it answers, and who asks:

==========================  ==================================================  ================================
table                       what it answers                                     used by
==========================  ==================================================  ================================
``LAYER_PATHS``             where the block stack lives (tried in order)        ``model.structure.find_layers``
``LAYER_COUNT_FIELDS``      the config field declaring the number of blocks     ``model.structure``
``ATTENTION_NAMES``         a block's attention child                           ``model.structure.sublayers``
``MLP_NAMES``               a block's MLP (or MoE) child                        ``model.structure.sublayers``
``SUBLAYER_OUTPUTS``        where a sub-layer's update is, when not its child   ``model.structure.sublayer_site``
``SUBLAYER_POST_NORMS``     norms applied to a sub-layer's output (sandwich)    ``model.structure.sublayer_site``
``SUBLAYER_MODULES``        a sub-layer's modules, when not one child           ``model.cost``
``ATTENTION_OUTPUT_...``    an attention's output projection                    ``checkpoint.reference``
``CACHE_KWARGS``            the keyword a block receives its KV cache under     ``interventions.removal``
``WINDOW_FIELDS``           config fields bounding how far attention reaches    ``engine.budget``
``PER_LAYER_CONFIG_LISTS``  per-block config lists, cut with the blocks          ``checkpoint.reference``
``ENCODER_ONLY_*``          which checkpoints load with their masked-LM head    ``model.load``
``POST_LN_BLOCKS``          blocks whose forward is Llama's (Post-LN twins)     ``interventions.postln``
``OUTPUT_PROJECTIONS``      sub-layer output projections (scaled init)          ``interventions.lns.initialize``
``MLP_OUTPUT_PROJECTIONS``  an MLP's (or expert's) output projection            ``heal.sites``
``ALIASES``                 the paper's models by the short names of its plots  ``model.load``, ``cli``
==========================  ==================================================  ================================
"""

from __future__ import annotations

#: Where the block stack lives. Tried in order; the first non-empty ModuleList wins (after them,
#: any single ModuleList as long as the configured layer count).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Mixtral, Qwen2/3(-MoE), DeepSeek-V2/V3, Gemma2/3, Phi3
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "bert.encoder.layer",  # BERT
    "roberta.encoder.layer",
    "encoder.layer",  # bare BertModel
    "transformer.layers",
    "backbone.layers",
    "layers",
    "h",
)

#: Config fields that declare the number of blocks, tried in order (of the text config).
LAYER_COUNT_FIELDS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")

#: Child names of a block's attention sub-layer; the first one present wins.
ATTENTION_NAMES: tuple[str, ...] = ("self_attn", "attention", "attn", "self_attention")
#: Child names of a block's MLP (or mixture-of-experts) sub-layer; the first one present wins.
MLP_NAMES: tuple[str, ...] = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "intermediate")

#: Blocks whose sub-layer update to the residual stream is not their attention / MLP child's output, by
#: class name: the module whose output is the update (dotted, relative to the block). BERT adds and
#: normalises inside its attention child (``attention.output``), so the update is the projection
#: before that add; OPT's MLP is inline (``fc1``, ``fc2`` are direct children of the block).
SUBLAYER_OUTPUTS: dict[str, dict[str, str]] = {
    "BertLayer": {"attn": "attention.output.dense", "mlp": "output.dense"},
    "RobertaLayer": {"attn": "attention.output.dense", "mlp": "output.dense"},
    "OPTDecoderLayer": {"mlp": "fc2"},
}

#: Sandwich-norm blocks: the norm each sub-layer's output passes through before the residual add (a
#: removed sub-layer's norm is removed with it, so it adds exactly nothing even where a norm of zeros
#: is not zero). Llama's ``post_attention_layernorm`` is the MLP's *input* norm, so this is by class.
SUBLAYER_POST_NORMS: dict[str, dict[str, str]] = {
    "Gemma2DecoderLayer": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "Gemma3DecoderLayer": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "Olmo2DecoderLayer": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "Olmo3DecoderLayer": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
}

#: The modules a sub-layer is made of where it is not one child of its block, by class name (dotted,
#: relative to the block): what removing it saves. BERT's attention child also holds the post-add norm,
#: which still runs; OPT's MLP is inline.
SUBLAYER_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "BertLayer": {"attn": ("attention.self", "attention.output.dense"), "mlp": ("intermediate", "output.dense")},
    "RobertaLayer": {"attn": ("attention.self", "attention.output.dense"), "mlp": ("intermediate", "output.dense")},
    "OPTDecoderLayer": {"mlp": ("fc1", "fc2")},
}

#: Names of an attention's output projection (the reference of a removed attention zeroes it).
ATTENTION_OUTPUT_PROJECTIONS: tuple[str, ...] = ("o_proj", "out_proj", "c_proj", "dense", "wo")

#: Keyword names under which blocks receive their KV cache (transformers 4.x and 5.x): a removed
#: block still runs when a call carries one, so the cache it would have written is there.
CACHE_KWARGS: tuple[str, ...] = ("past_key_values", "past_key_value", "layer_past")

#: Config fields that bound how far back a token attends (field, how to call it): a row longer
#: than the window holds keys no query uses.
WINDOW_FIELDS: tuple[tuple[str, str], ...] = (
    ("sliding_window", "sliding window"),  # Mistral, Qwen2, Gemma 2/3, Phi-3, Cohere 2, GPT-OSS, ...
    ("window_size", "local attention window"),  # GPT-Neo
    ("attention_window", "local attention window"),  # Longformer, LED
    ("attention_window_size", "local attention window"),  # RecurrentGemma
    ("sliding_window_size", "sliding window"),  # MiMo-V2
    ("local_attention_window_len", "local attention window"),  # BLT
    ("local_attention", "local attention window"),  # ModernBERT
    ("attention_chunk_size", "attention chunk"),  # Llama 4: chunked attention
    ("sliding_windows", "sliding window"),
)

#: Config fields that hold one entry per block (its attention kind, rope or not, ...): a model
#: built without some blocks keeps the entries of the others.
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = ("layer_types", "no_rope_layers", "mlp_layer_types",
                                           "attention_layer_types")

#: Architecture suffixes and model types of encoder-only models, which load with their masked-LM
#: head (BERT) rather than as causal LMs.
ENCODER_ONLY_ARCHITECTURES: tuple[str, ...] = ("ForMaskedLM", "ForPreTraining")
ENCODER_ONLY_MODEL_TYPES: frozenset[str] = frozenset({
    "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert",
    "albert", "modernbert",
})

#: Blocks whose pre-LN forward is exactly Llama's, so moving the norms after the residual adds
#: is the whole of a Post-LN twin.
POST_LN_BLOCKS: tuple[str, ...] = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                                   "Qwen3DecoderLayer")

#: Names of the sub-layers' output projections (what depth-scaled initialisation shrinks).
OUTPUT_PROJECTIONS: tuple[str, ...] = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2", "w2",
                                       "wo")

#: Names of an MLP's output projection, where a linear heal is folded: a module (``nn.Linear``,
#: GPT-2's ``Conv1D``) or a fused experts' 3-D parameter, anywhere inside the block's MLP child (each
#: routed and shared expert of a mixture); a direct child of the block where the MLP has no child of its
#: own (OPT's ``fc2``).
MLP_OUTPUT_PROJECTIONS: tuple[str, ...] = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo")

#: The paper's models, by the short names its figures use.
ALIASES: dict[str, str] = {
    "llama": "meta-llama/Llama-2-7b-hf",
    "llama-13b": "meta-llama/Llama-2-13b-hf",
    "mistral": "mistralai/Mistral-7B-v0.1",
    "qwen": "Qwen/Qwen3-8B",
    "deepseek": "deepseek-ai/deepseek-llm-7b-base",
    "bert": "google-bert/bert-large-uncased",
}
