"""Shared fixtures: tiny real BERT models built on disk, a local Ray instance, the shared data root."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Object-store credentials for the S3 server tests start on 127.0.0.1 (moto accepts any key), set before the
# session's Ray starts so its workers inherit them; the tests check the secret is never written anywhere.
S3_SECRET = "leaf-test-secret-do-not-log"
for _name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)
os.environ.update(AWS_ACCESS_KEY_ID="leaf-test-key", AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1")

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("LEAF_DATA_DIR", REPO.parent / "shared" / "data"))
# Teacher caches of the bundled real models' vectors of real data sets, kept across test runs and clones like the
# Hugging Face cache: a cold machine encodes them once (minutes on 2 cores), later runs only read them.
REAL_VECTORS_CACHE = Path(os.environ.get("LEAF_TEST_VECTORS_CACHE",
                                         Path.home() / ".cache" / "leaf-ray" / "test-vectors"))
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


def build_tiny_mpnet(directory: Path, tokenizer_source: Path, layers: int) -> Path:
    """A plain Hugging Face MPNet directory (the replica teacher's architecture: relative attention bias shared
    across layers, no token types) with `tokenizer_source`'s tokenizer."""
    import torch
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    MPNetModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return Path(directory)


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


# What the session's Ray advertises besides 2 CPUs: an accelerator label and a node-pool resource, for the
# placement tests (train.accelerator_type, train.resources_per_worker).
SESSION_RAY_RESOURCES = {"accelerator_type:A100": 1, "train_pool": 1}


@pytest.fixture(scope="session")
def ray_local():
    """The test run's one local Ray instance, started the way a local job starts it (2 CPUs, like the machines
    this runs on); no test restarts it, and in-process jobs join it."""
    import ray

    from leaf_ray.config import RayConfig
    from leaf_ray.runtime import init_ray

    if ray.is_initialized():
        pytest.fail("a test started Ray (e.g. Ray Data's auto-init) before the session's instance: request ray_local")
    init_ray(RayConfig(num_cpus=2, resources=SESSION_RAY_RESOURCES))
    os.environ.pop("RAY_API_SERVER_ADDRESS")  # its processes have it; the jobs tests start must find their own
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def load_script(script: str):
    """A job or benchmark script as a module (the scripts are files, not a package, so they load by path)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script: str, *args: str):
    """A job or benchmark script's `main(args)` run in this process, on the session's Ray (request `ray_local`):
    what it returns and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = load_script(script).main(list(args))
    return result, printed.getvalue()


# -- student / training fixtures ---------------------------------------------------------------------------

TEACHER_PROMPTS = {"query": "query: ", "document": "passage: "}


def tiny_teacher_config(model_dir: Path, **overrides):
    """A TeacherConfig for a tiny teacher directory, with distinct query/document prompts."""
    from leaf_ray.config import TeacherConfig

    return TeacherConfig(model=str(model_dir), query_prompt=TEACHER_PROMPTS["query"],
                         document_prompt=TEACHER_PROMPTS["document"], max_length=64, batch_size=32, **overrides)


def text_rows(n: int, seed: int = 0):
    """`n` rows {id, text, kind}: short queries (every third row is a longer document)."""
    import pyarrow as pa

    short, long = random_texts(n, seed, 3, 10), random_texts(n, seed + 1, 15, 40)
    kinds = ["document" if i % 3 == 0 else "query" for i in range(n)]
    texts = [long[i] if kind == "document" else short[i] for i, kind in enumerate(kinds)]
    return pa.table({"id": [f"r{seed}-{i}" for i in range(n)], "text": texts, "kind": kinds})


def cached_rows(teacher_dir: Path, texts, path: Path):
    """The teacher cache's columns (id, text, kind, embedding as fixed-size float32 list) for `texts`,
    embedded in-process with sentence-transformers, written to and read back from parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(teacher_dir), device="cpu", prompts=TEACHER_PROMPTS)
    kinds = np.array(texts.column("kind").to_pylist())
    vectors = np.zeros((len(texts), teacher.get_embedding_dimension()), dtype=np.float32)
    for kind in ("query", "document"):
        rows = np.flatnonzero(kinds == kind)
        vectors[rows] = teacher.encode([texts.column("text")[int(i)].as_py() for i in rows], prompt_name=kind,
                                       normalize_embeddings=True)
    flat = pa.array(vectors.reshape(-1))
    pq.write_table(texts.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])), path)
    return pq.read_table(path)


@pytest.fixture(scope="session")
def tiny_cache(tiny_teacher, tmp_path_factory):
    """480 rows of the tiny teacher's vectors, as a teacher cache would hold them."""
    return cached_rows(tiny_teacher, text_rows(480), tmp_path_factory.mktemp("tiny_cache") / "part-00000.parquet")


# -- Hugging Face cache layouts (offline stand-ins for the Hub) -------------------------------------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache: Path, repo_id: str, revision: str | None = None, commit: str = HUB_COMMIT) -> Path:
    """An empty snapshot (`commit`) of dataset `repo_id` in the Hugging Face cache at `cache`, reachable by
    `revision`: a branch's ref (default `main`), or the commit itself."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    if revision != commit:
        (repo / "refs" / (revision or "main")).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot
