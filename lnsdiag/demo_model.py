"""The demo model: a small Llama trained offline on the standard library's docstrings.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .progress import SILENT, Progress
from .runs import cache_dir, write_json
from .text import TextSource, stdlib_corpus
from .training import TrainLog, train_causal_lm
from .windows import special_tokens_around

#: Bump when the demo's recipe changes, so stale cached models are not reused.
RECIPE_VERSION = 1

#: Where a demo model normalises: the paper's baseline, its fix, and the original Transformer.
NORMS: tuple[str, ...] = ("pre-ln", "lns", "post-ln")
#: New spec fields, left out of the cache key at these defaults so existing keys stay valid.
_KEY_DEFAULTS = {"norm": "pre-ln", "init": "default"}


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
    steps: int = 250
    lr: float = 3e-3
    seed: int = 0
    norm: str = "pre-ln"  # pre-ln, lns (LayerNorm Scaling) or post-ln
    init: str = "default"  # default or scaled (depth-scaled output projections; see lns.initialize)

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if _KEY_DEFAULTS.get(k, object()) != v}
        blob = json.dumps({**fields, "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        suffix = "" if self.norm == "pre-ln" else f"-{self.norm}"
        suffix += "" if self.init == "default" else f"-{self.init}-init"
        return f"demo-llama-{self.layers}L-{self.hidden}d{suffix}"

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


def text_digest(text: TextSource) -> str:
    """A short hash of a training text, so models trained on other text get other folders."""
    digest = hashlib.sha256()
    for doc in text.texts:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def demo_dir(spec: DemoSpec, text: TextSource | None = None) -> Path:
    key = spec.key() if text is None else hashlib.sha256(f"{spec.key()}:{text_digest(text)}".encode()).hexdigest()[:12]
    return cache_dir() / "demo" / f"{spec.name}-{key}"


def prepare_model(model: Any, spec: DemoSpec) -> Any:
    """Give a freshly built model the spec's init and norm placement (before training)."""
    from . import lns, postln

    if spec.norm not in NORMS:
        raise UserError(f"unknown norm {spec.norm!r} (use {', '.join(NORMS)})")
    lns.initialize(model, spec.init)
    if spec.norm == "lns":
        lns.apply_lns(model)
    elif spec.norm == "post-ln":
        postln.apply_post_ln(model)
    return model


def ensure_demo_model(
    spec: DemoSpec,
    *,
    fresh: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress = SILENT,
    text: TextSource | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Return the cached demo model's directory, training it first if needed.

    ``text`` trains on other text than the stdlib docstrings (tokenizer and model). The
    spec's ``norm`` and ``init`` are applied to the freshly built model, so twins that differ
    only there start from the same weights and see the same batches.

    Training writes to a temporary folder that is renamed when complete, so an
    interrupted run never leaves a half-trained model in the cache. ``progress`` sees a
    phase for the tokenizer, then ``training <name>`` with one unit per step.
    """
    target = demo_dir(spec, text)
    record_path = target / "train_log.json"
    if target.is_dir() and record_path.is_file() and not fresh:
        return target, json.loads(record_path.read_text(encoding="utf-8"))
    texts = text.texts if text is not None else stdlib_corpus("train").texts
    corpus = text.name if text is not None else "stdlib-docstrings[train]"
    progress.phase(f"training a tokenizer on {'the stdlib docstrings' if text is None else corpus}")
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(texts, spec.vocab)
    if text is None:
        stream = corpus_stream(tokenizer, "train")
    else:
        stream = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    prefix, _ = special_tokens_around(tokenizer)
    if len(stream) <= spec.seq_len - len(prefix):
        raise UserError(f"the training text has {len(stream)} tokens, too few for --seq-len {spec.seq_len}: "
                        "give more text or a shorter sequence length")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(demo_config(spec, tokenizer), dtype=torch.float32)
    prepare_model(model, spec)
    model.to(device)
    progress.phase(f"training {spec.name}", total=spec.steps)
    log: TrainLog = train_causal_lm(
        model, stream, steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
        lr=spec.lr, seed=spec.seed, prefix=prefix, progress=progress,
    )
    record = {"spec": asdict(spec), "recipe": RECIPE_VERSION, "corpus": corpus,
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
