"""Shared fixtures: no network, a private cache, a tiny saved model with a trained tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

SAMPLE_TEXT = (
    "The residual stream of a pre-norm transformer grows with depth. Each block adds its update to the "
    "stream, and the norm in front of the block rescales what the block sees. Deep blocks therefore see "
    "a large stream and add a comparatively small update: their output is nearly their input. "
    "Removing such a block changes little, while removing an early block breaks the model. "
    "LayerNorm Scaling divides the norm output by the square root of the layer index. "
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LNSDIAG_CACHE", str(tmp_path_factory.getbasetemp() / "lnsdiag-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained in-test (no hub)."""
    from lnsdiag.demo.model import train_tokenizer

    texts = [SAMPLE_TEXT * 3, "def f(x):\n    return x + 1\n" * 5, "Numbers 0 1 2 3 4 5 6 7 8 9."]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A 4-layer random Llama saved with its tokenizer, loadable like any checkpoint."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    return path


class ProgressLog:
    """A :class:`lnsdiag.progress.Progress` that records what it is told, and can stop the work
    (Ctrl-C) at its ``stop_at``-th ``advance``: interruptions driven by the work's own progress."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at
        self.advances = 0

    def phase(self, name: str, total: float | None = None) -> None:
        self.events.append(("phase", name, total))

    def advance(self, amount: float = 1, *, detail: str | None = None) -> None:
        self.events.append(("advance", amount))
        self.advances += 1
        if self.stop_at is not None and self.advances == self.stop_at:
            raise KeyboardInterrupt

    def note(self, message: str) -> None:
        self.events.append(("note", message))

    def after(self, phase: str) -> list[tuple]:
        """The events after the (last) start of ``phase``."""
        starts = [i for i, e in enumerate(self.events) if e[:2] == ("phase", phase)]
        return self.events[starts[-1]:] if starts else []


def pytest_configure(config):
    config.addinivalue_line("markers", "retrain: retrains the shipped demo models from scratch (about 10 minutes); "
                                       "runs only with LNSDIAG_SLOW=1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``retrain`` take minutes of CPU: the normal suite skips them unless LNSDIAG_SLOW=1."""
    if os.environ.get("LNSDIAG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="retrains the demo models (about 10 minutes on 2 cores): set LNSDIAG_SLOW=1")
    for item in items:
        if "retrain" in item.keywords:
            item.add_marker(skip)
