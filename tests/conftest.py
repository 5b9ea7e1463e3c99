"""Shared fixtures: tiny real BERT models built on disk, a local Ray instance, the shared data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("LEAF_DATA_DIR", REPO.parent / "shared" / "data"))
WORDS = ("the a of to and in is for on with as by at from protein cell gene study results patients effect "
         "model data method increase decrease human mouse treatment risk analysis expression level").split()


def build_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A real (random-weight) BERT sentence-transformers model: WordPiece tokenizer, safetensors, mean pooling."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    raw = directory / "hf"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
             *"abcdefghijklmnopqrstuvwxyz0123456789.,?!-"]
    (raw / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(vocab=str(raw / "vocab.txt"), do_lower_case=True).save_pretrained(raw)  # transformers 5: `vocab`
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(raw, safe_serialization=True)
    encoder = models.Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[encoder, models.Pooling(hidden, "mean"), models.Normalize()], device="cpu")
    model.save(str(directory / "model"), safe_serialization=True)
    return directory / "model"


def random_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 30) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_teacher"), hidden=32, layers=4)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.fail(f"shared data root {DATA_ROOT} not found; set LEAF_DATA_DIR")
    return DATA_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs, like the machines this runs on)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
