"""The embedded default: a small Llama trained offline on the standard library's docstrings.

A random model shows nothing and many machines cannot reach the hub, so ``lnsdiag demo``
trains its own model (12 layers by default, a few minutes on a laptop CPU), caches it, and
runs the diagnostics on it through the same functions and the same loading path
(``load_model(directory)``) a user's checkpoint goes through.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .runs import cache_dir, write_json
from .text import special_tokens_around, stdlib_corpus
from .training import TrainLog, train_causal_lm

#: Bump when the demo's recipe changes, so stale cached models are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines a demo model; its hash names the cache entry."""

    layers: int = 12
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    vocab: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"demo-llama-{self.layers}L-{self.hidden}d"

    def with_(self, **changes: Any) -> DemoSpec:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with Llama-style special tokens (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1 << 20,
    )


def demo_config(spec: DemoSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max(spec.seq_len, 512), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def corpus_stream(tokenizer: Any, split: str = "train") -> torch.Tensor:
    """The stdlib-docstring corpus as one token stream (documents joined by blank lines)."""
    texts = stdlib_corpus(split).texts
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def demo_dir(spec: DemoSpec) -> Path:
    return cache_dir() / "demo" / f"{spec.name}-{spec.key()}"


def ensure_demo_model(
    spec: DemoSpec,
    *,
    fresh: bool = False,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Return the cached demo model's directory, training it first if needed.

    Training writes to a temporary folder that is renamed when complete, so an
    interrupted run never leaves a half-trained model in the cache.
    """
    target = demo_dir(spec)
    record_path = target / "train_log.json"
    if target.is_dir() and record_path.is_file() and not fresh:
        return target, json.loads(record_path.read_text(encoding="utf-8"))
    note = on_phase or (lambda _msg: None)
    note("training a tokenizer on the stdlib docstrings")
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(stdlib_corpus("train").texts, spec.vocab)
    stream = corpus_stream(tokenizer, "train")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(demo_config(spec, tokenizer), dtype=torch.float32).to(device)
    note(f"training {spec.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
         f"{spec.steps} steps)")
    prefix, _ = special_tokens_around(tokenizer)
    log: TrainLog = train_causal_lm(
        model, stream, steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
        lr=spec.lr, seed=spec.seed, prefix=prefix, on_step=on_step,
    )
    record = {"spec": asdict(spec), "recipe": RECIPE_VERSION, "corpus": "stdlib-docstrings[train]",
              "corpus_tokens": len(stream), "train": log.as_dict()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.cpu().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / "train_log.json", record)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, record
