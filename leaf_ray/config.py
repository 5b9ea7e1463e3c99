"""Typed run configuration: one pydantic model per concern, loaded from YAML with `a.b=c` overrides.

Every section forbids unknown keys, so a typo is an error that names the dotted key and suggests the
closest valid one instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from leaf_ray.errors import LeafRayError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"

Kind = Literal["query", "document"]

_SHORT = reprlib.Repr()  # bad values in error messages, cut to a readable length
_SHORT.maxstring = _SHORT.maxother = 80


class ConfigError(LeafRayError, ValueError):
    """A config that cannot be used; the message names the offending key or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(_Section):
    """One text source. `path` is absolute or relative to the data root."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "beir"] = "auto"
    name: str | None = None
    # Assigns a kind to every row of a source whose rows carry none (e.g. a corpus-only parquet).
    kind: Kind | None = None
    # For BEIR folders: which parts become text rows (corpus -> documents, queries -> queries).
    beir_parts: list[Literal["corpus", "queries"]] = ["corpus", "queries"]
    limit: int | None = Field(default=None, gt=0)
    # Per-kind limits apply after `limit`-free reading, before the mix is shuffled.
    limit_queries: int | None = Field(default=None, ge=0)
    limit_documents: int | None = Field(default=None, ge=0)
    id_field: str | None = "id"  # None: a parquet file without ids; its rows are named `<name>:<row number>`
    id_prefix: str = ""  # put before every id: keeps apart datasets whose ids repeat (1, 2, ... in each)
    text_field: str = "text"
    kind_field: str = "kind"

    @model_validator(mode="after")
    def _ids_from_rows(self) -> DataSource:
        if self.id_field is None and not (self.format == "parquet"
                                          or (self.format == "auto" and self.path.endswith(".parquet"))):
            raise ValueError(f"id_field: null (ids from row numbers) needs a parquet source; {self.path!r} is not one")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class DataConfig(_Section):
    root: str | None = None  # None: $LEAF_DATA_DIR, else ../shared/data beside the repo
    # The Hugging Face dataset (`org/name[@revision]`) each top-level entry of the data root mirrors: read
    # from the Hugging Face cache (or the Hub, with allow_hub) when the root lacks it.
    # Revisions are pinned (as mteb pins them) so every machine reads the same files.
    hub: dict[str, str] = {"scifact": "mteb/scifact@0228b52cf27578f30900b9e5271d331663a030d7",
                           "stsbenchmark": "mteb/stsbenchmark-sts@b0fddb56ed78048fa8b90373c8a3cfc37b684831"}
    sources: list[DataSource] = []
    seed: int = 0
    dedupe_texts: bool = True  # drop rows whose (kind, text) repeats an earlier row
    duplicate_ids: Literal["error", "dedupe"] = "error"
    empty_texts: Literal["error", "drop"] = "drop"  # dropped rows are counted and reported
    validation_size: int = Field(default=200, ge=0)  # held-out texts for training validation
    _allow_hub: bool = PrivateAttr(default=False)  # the run's allow_hub, set by RunConfig

    def resolved_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser()
        if os.environ.get("LEAF_DATA_DIR"):
            return Path(os.environ["LEAF_DATA_DIR"]).expanduser()
        return (REPO_ROOT.parent / "shared" / "data").resolve()

    def resolve_path(self, path: str) -> Path:
        """A local path that exists: absolute, under the data root, or from the Hugging Face cache or Hub."""
        from leaf_ray.data.hub import resolve_data_path

        return resolve_data_path(path, self.resolved_root(), self.hub, self._allow_hub)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class VllmOptions(_Section):
    """Engine options of the `vllm` teacher backend (one `vllm.LLM(runner="pooling")` per actor)."""

    # None follows teacher.dtype, where "auto" means float32 on CPU and the model's own dtype on GPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    max_model_len: int | None = Field(default=None, gt=0)  # None: teacher.max_length
    # On the CPU backend this is the fraction of *RAM* vLLM reserves. None: 0.05 on CPU, 0.9 x the
    # actor's GPU share on GPU.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enforce_eager: bool | None = None  # None: True on CPU (no graph capture), False on GPU
    tensor_parallel_size: int = Field(default=1, ge=1)  # GPUs per engine; needs num_gpus_per_actor >= it
    hf_overrides: dict[str, Any] = {}  # e.g. {is_matryoshka: true} for Matryoshka teachers
    dimensions: int | None = Field(default=None, gt=0)  # Matryoshka output size (PoolingParams(dimensions=...))
    engine_kwargs: dict[str, Any] = {}  # any other vllm.LLM(...) argument, passed through


class EndpointOptions(_Section):
    """Options of the `endpoint` teacher backend: an OpenAI-compatible POST {base_url}/v1/embeddings."""

    base_url: str | None = None  # e.g. http://embed.internal:8000 (required for backend: endpoint)
    model: str | None = None  # the served model name; None: teacher.model
    # NAME of the environment variable that holds the API key (the key itself never goes in a config).
    api_key_env: str | None = None
    max_concurrency: int = Field(default=4, ge=1)  # requests in flight per actor
    max_retries: int = Field(default=5, ge=0)  # on 429, 5xx, timeouts and connection errors
    backoff_s: float = Field(default=0.5, ge=0)  # first retry wait; doubles each retry (with jitter)
    backoff_max_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    request_batch_size: int = Field(default=64, ge=1)  # texts per HTTP request
    dimensions: int | None = Field(default=None, gt=0)  # OpenAI `dimensions` (Matryoshka servers)
    # vLLM servers: send `truncate_prompt_tokens: teacher.max_length` so long texts are cut, not refused.
    truncate_prompt_tokens: bool = False
    tokenizer: str | None = None  # local tokenizer for truncation counts; None: teacher.model when it resolves

    @model_validator(mode="after")
    def _key_is_a_name(self) -> EndpointOptions:
        # Checked here (not per field) so a pasted key is not echoed back in the config error.
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError("endpoint.api_key_env must be the NAME of an environment variable that holds the key "
                             "(letters, digits, _), never the key itself")
        return self


class TeacherConfig(_Section):
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    # transformers: PyTorch; onnx: the fused ONNX graph on CPU (faster there, checked against PyTorch first);
    # vllm: a vLLM engine in each actor; endpoint: an OpenAI-compatible /v1/embeddings server.
    backend: Literal["transformers", "onnx", "vllm", "endpoint"] = "transformers"
    query_prompt: str = ""
    document_prompt: str = ""
    max_length: int = Field(default=256, gt=0)
    batch_size: int = Field(default=64, gt=0)  # texts per forward pass inside an actor
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    normalize: bool = True
    cache_dtype: Literal["float32", "float16"] = "float32"
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    # Placement on heterogeneous clusters: the GPU model the actors need (Ray's accelerator_type: "L4",
    # "A10G", "A100", ...) and custom resources per actor ({"teacher_pool": 1}). Unset: any node.
    accelerator_type: str | None = None
    resources_per_actor: dict[str, float] = {}
    # torch intra-op threads inside each actor; None = the actor's CPU count rounded up.
    torch_threads: int | None = Field(default=None, gt=0)
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    chunk_rows: int = Field(default=1024, gt=0)  # most rows per cache part (the unit of resume)
    on_damaged_cache: Literal["recompute", "error"] = "recompute"  # a truncated/mis-sized cache part
    vllm: VllmOptions = VllmOptions()  # backend: vllm
    endpoint: EndpointOptions = EndpointOptions()  # backend: endpoint

    @model_validator(mode="after")
    def _pool_range(self) -> TeacherConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        return self

    @model_validator(mode="after")
    def _backend_options(self) -> TeacherConfig:
        if self.backend == "onnx" and (self.num_gpus_per_actor > 0 or self.dtype not in ("auto", "float32")):
            raise ValueError("teacher.backend 'onnx' runs float32 on CPU: set num_gpus_per_actor: 0 and dtype: auto "
                             "(or use the transformers or vllm backend on GPUs)")
        if self.backend == "endpoint" and not self.endpoint.base_url:
            raise ValueError("teacher.endpoint.base_url is required when teacher.backend is 'endpoint'")
        if self.backend == "vllm":
            if self.vllm.max_model_len is not None and self.vllm.max_model_len < self.max_length:
                raise ValueError(f"teacher.vllm.max_model_len ({self.vllm.max_model_len}) < teacher.max_length "
                                 f"({self.max_length})")
            if self.vllm.tensor_parallel_size > 1 and self.num_gpus_per_actor < self.vllm.tensor_parallel_size:
                raise ValueError(f"teacher.vllm.tensor_parallel_size ({self.vllm.tensor_parallel_size}) needs "
                                 f"num_gpus_per_actor >= it (got {self.num_gpus_per_actor})")
        return self

    @property
    def backend_options(self) -> dict | None:
        """The backend settings that change vectors (part of the cache's teacher spec); None for transformers.

        Engine sizing (memory, eager mode, parallelism) and endpoint plumbing (URL, key, retries) are left
        out: they do not change the vectors, and a server that moves keeps its cache.
        """
        if self.backend == "vllm":
            return {"dtype": self.vllm.dtype, "hf_overrides": self.vllm.hf_overrides,
                    "dimensions": self.vllm.dimensions}
        if self.backend == "endpoint":
            return {"model": self.endpoint.model or self.model, "dimensions": self.endpoint.dimensions,
                    "truncate_prompt_tokens": self.endpoint.truncate_prompt_tokens}
        return None

    def prompt_for(self, kind: str) -> str:
        return self.query_prompt if kind == "query" else self.document_prompt


class StudentConfig(_Section):
    kind: Literal["pretrained", "teacher_layers", "fresh"] = "teacher_layers"
    model: str | None = None  # pretrained: encoder id/path
    layers: list[int] | None = None  # teacher_layers: indices of teacher layers to keep
    num_layers: int = Field(default=3, gt=0)  # fresh
    hidden_size: int = Field(default=384, gt=0)
    num_heads: int = Field(default=12, gt=0)
    intermediate_size: int | None = None
    max_length: int = Field(default=256, gt=0)
    projection_init: Literal["random", "lstsq"] = "lstsq"
    projection_init_samples: int = Field(default=2048, gt=0)
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> StudentConfig:
        if self.kind == "pretrained" and not self.model:
            raise ValueError("student.model is required when student.kind is 'pretrained'")
        return self


class TrainConfig(_Section):
    mode: Literal["cache", "stream"] = "cache"
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)  # per worker
    lr: float = Field(default=1e-4, gt=0)
    head_lr: float | None = Field(default=None, gt=0)  # the projection head's own learning rate; None: train.lr
    # Train only the projection head for this many first steps (the encoder's lr held at 0), then everything.
    head_only_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "linear", "cyclic_linear"] = "linear"
    cycles: int = Field(default=1, gt=0)  # cyclic_linear: linear decays restarted this many times
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # decays end at lr x this (the paper: 1e-4 -> 1e-5 is 0.1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    loss: Literal["l2", "mse", "cosine"] = "l2"
    seed: int = 0
    checkpoint_every_steps: int | None = Field(default=None, gt=0)  # None: once per epoch
    num_workers: int = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=0.5, gt=0)  # fractional on small machines: Ray Data needs CPUs beside the workers
    gpus_per_worker: float = Field(default=0.0, ge=0)
    torch_threads: int | None = Field(default=None, gt=0)
    max_failures: int = Field(default=0, ge=-1)
    log_every_steps: int = Field(default=10, gt=0)  # progress line and ray.train.report cadence
    # Validate (and report val_loss / val_cosine to Ray Train) every this many steps besides each epoch's end:
    # what early-stopping sweeps (Ray Tune's ASHA) act on. None: only at epoch ends.
    validate_every_steps: int | None = Field(default=None, gt=0)
    keep_checkpoints: int | None = Field(default=2, gt=0)  # newest checkpoints kept per run; None keeps all
    shuffle_buffer_rows: int = Field(default=1024, ge=0)  # per-worker local shuffle, reseeded each epoch; 0: off
    # Batches cut from one length-sorted pool of shuffled rows (less padding: see train.length_grouped_batches);
    # 0 or 1: plain batches in shuffle order.
    length_group_batches: int = Field(default=16, ge=0)
    # Each batch's forward pass as up to this many length-sorted sub-batches, each padded to its own longest text
    # (train.forward_by_length): random batches at close to grouped speed. 1: the batch padded as one.
    padding_buckets: int = Field(default=1, gt=0)
    # Placement on heterogeneous clusters, as for the teacher: the GPU model the workers need (Ray's
    # accelerator_type: "A100", "H100", ...) and custom resources per worker ({"train_pool": 1}). Unset: any node.
    accelerator_type: str | None = None
    resources_per_worker: dict[str, float] = {}

    @model_validator(mode="after")
    def _extra_resources_only(self) -> TrainConfig:
        clash = sorted({"CPU", "GPU"} & set(self.resources_per_worker))
        if clash:
            raise ValueError(f"train.resources_per_worker: {clash} are set by train.cpus_per_worker / "
                             "train.gpus_per_worker; list only custom resources here")
        return self


class EvalConfig(_Section):
    datasets: list[str] = ["scifact"]  # BEIR folders under the data root (or absolute)
    split: str = "test"
    sts: str | None = "stsbenchmark"  # STS folder under the data root; None skips STS
    dims: list[int] = []  # Matryoshka dims besides the full dimension
    quantizations: list[Literal["float32", "int8", "binary"]] = ["float32", "int8", "binary"]
    batch_size: int = Field(default=64, gt=0)
    max_corpus: int | None = Field(default=None, gt=0)  # subsample corpus (keeps judged docs)
    max_queries: int | None = Field(default=None, gt=0)
    # Serving speed of teacher vs leaf in the run report, on this many queries and documents of the first
    # dataset (measured side by side); 0 skips it.
    throughput_samples: int = Field(default=200, ge=0)
    seed: int = 0  # for the max_corpus / max_queries subsamples
    # Which prompt STS sentences get: symmetric pairs have no query side; "document" is the empty prompt for
    # most teachers (arctic-embed, mpnet), "query" suits e5-style teachers that prompt symmetric tasks as queries.
    sts_kind: Kind = "document"


class ExportConfig(_Section):
    """What a finished run publishes besides its report: the leaf (runs/<name>/student) with its model card, and
    optionally the asymmetric pair as one model."""

    license: str | None = None  # the model cards' Hub licence id (apache-2.0, mit, ...); None leaves it out
    # runs/<name>/asym: one sentence-transformers model that encodes queries with the leaf and documents with the
    # teacher (leaf_ray.asym). Off by default: it holds a whole copy of the teacher's weights, most of its size,
    # in every run folder, while asymmetric serving only needs the leaf next to the teacher one already runs.
    asymmetric: bool = False


class TrackingConfig(_Section):
    """Experiment tracking in MLflow (`pip install 'leaf-ray[tracking]'`; leaf_ray.tracking): the run's config as
    parameters, every metrics.jsonl record as metrics, the results and the exported student; a sweep logs each
    trial as a run of its own. Credentials (MLFLOW_TRACKING_TOKEN, ...) come from the environment only."""

    mlflow: bool = False  # log this run (and each sweep trial) to MLflow
    # Any MLflow tracking URI (http://host:5000, databricks, sqlite:///path/mlflow.db). None: an SQLite store at
    # <runs_root>/mlflow.db, which only processes on this machine reach: give a server's URI on a cluster.
    uri: str | None = None
    experiment: str = "leaf-ray"  # created when missing
    log_student: bool = True  # upload the exported student as the run's artifact `student/`

    def resolved_uri(self, storage: StorageConfig) -> str:
        """`uri`, or the SQLite store under a local runs_root (refused for an object-store runs_root)."""
        if self.uri is not None:
            return self.uri
        from leaf_ray.storage import local_root

        root = local_root(storage.runs_root, "storage.runs_root")
        if root is None:
            raise ConfigError("tracking.uri: storage.runs_root is an object store, which MLflow's default SQLite "
                              "store cannot live in; give a tracking server's URI")
        return f"sqlite:///{(root.expanduser().resolve() / 'mlflow.db').as_posix()}"


class AshaConfig(_Section):
    """Early stopping of sweep trials (Ray Tune's ASHA) on the training validation cosine, reported every
    `train.validate_every_steps`: a trial below the rung's top 1/reduction_factor stops there."""

    enabled: bool = True
    grace_period_steps: int = Field(default=50, gt=0)  # no trial is stopped before this many steps
    reduction_factor: float = Field(default=2.0, gt=1)


SWEEPABLE = ("student.", "train.")  # what a trial may change: the teacher, data and evaluation stay shared


class SweepConfig(_Section):
    """A Ray Tune sweep (jobs/sweep.py): every student in `students` is trained with every combination of
    `grid`, all against one teacher cache; evaluation dims and quantizations are varied within each trial's
    evaluation (no retraining). Model selection uses `validation_split`; `evaluate.split` is only for the final
    report of the Pareto-optimal students."""

    # label -> dotted student.* / train.* overrides, e.g. {"tl-0-5": {"student.layers": [0, 5]}}; empty: the
    # configured student alone, labelled "base".
    students: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[Any]] = {}  # dotted student.* / train.* key -> values, crossed with every student
    validation_split: str = "train"  # of evaluate.datasets (SciFact's train queries and qrels)
    validation_max_queries: int | None = Field(default=200, gt=0)
    validation_max_corpus: int | None = Field(default=1000, gt=0)  # judged documents are always kept
    quality_mode: Literal["student", "asymmetric"] = "student"  # the Pareto front's quality axis
    # Which students are exported and scored on evaluate.split after the tuner: the Pareto front's, or every
    # evaluated one (an ablation's table; selection still uses validation_split only).
    test_scores: Literal["front", "all"] = "front"
    speed_metric: Literal["docs_per_s", "queries_per_s"] = "docs_per_s"  # the Pareto front's speed axis
    # Logical CPUs of a Tune trial (the Ray Train driver, which also evaluates its student); training workers
    # ask train.cpus_per_worker / gpus_per_worker on top. Fractional on small machines, so Ray Data keeps CPUs.
    cpus_per_trial: float = Field(default=0.25, gt=0)
    max_concurrent_trials: int | None = Field(default=None, gt=0)  # None: as many as the cluster's resources fit
    asha: AshaConfig = AshaConfig()

    @model_validator(mode="after")
    def _sweepable_keys(self) -> SweepConfig:
        keys = [(f"sweep.students.{label}.{key}", key) for label, values in self.students.items() for key in values]
        keys += [(f"sweep.grid.{key}", key) for key in self.grid]
        bad = [where for where, key in keys if not key.startswith(SWEEPABLE)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a sweep may only vary {' / '.join(p + '*' for p in SWEEPABLE)} "
                             "(one teacher cache and one evaluation are shared by all trials)")
        empty = [f"sweep.grid.{key}" for key, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"{', '.join(empty)}: give at least one value")
        return self


class RayConfig(_Section):
    address: str | None = None  # None: connect to $RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # local instance only
    num_gpus: int | None = None
    # Custom resources a local instance advertises, e.g. {"train_pool": 1} for a train.resources_per_worker
    # or {"accelerator_type:A100": 1} for an accelerator_type constraint, to try a cluster config on one machine.
    resources: dict[str, float] = {}
    # Ray Data's progress display. None: on a terminal only; a job's log (ray job submit, a file) gets leaf-ray's
    # own progress lines instead of a multi-line block every 10 s.
    progress_bars: bool | None = None


class StorageConfig(_Section):
    """Roots are local paths (relative to the working directory), file:///abs/path, s3://bucket/prefix or
    gs://bucket/prefix (leaf_ray.storage); object-store credentials come from the environment."""

    cache_root: str = ".leaf_cache"  # teacher caches (and, when local, reassembled bundled models)
    runs_root: str = "runs"  # one folder per run name: checkpoints, student, results
    # Local disk for what cannot live in a bucket: reassembled bundled models and local copies of remote
    # runs (the exported student). None: cache_root when it is local, else ~/.cache/leaf-ray.
    local_cache: str | None = None
    # An S3-compatible server for s3:// roots (MinIO, Ceph, moto): http(s)://host:port. None: AWS itself.
    endpoint_override: str | None = None

    @model_validator(mode="after")
    def _usable_roots(self) -> StorageConfig:
        # Syntax only (no network): a bad scheme fails at load time, an unreachable bucket at
        # RunFolder.check_writable. One section-level check, so a URI with credentials is never echoed.
        from leaf_ray.storage import check_endpoint, local_root

        local_root(self.cache_root, "storage.cache_root")
        local_root(self.runs_root, "storage.runs_root")
        if self.local_cache is not None and local_root(self.local_cache, "storage.local_cache") is None:
            raise ValueError("storage.local_cache must be a local directory (it holds model weights)")
        if self.endpoint_override is not None:
            check_endpoint(self.endpoint_override, "storage.endpoint_override")
        return self

    def cache_location(self):
        """The teacher-cache root as a leaf_ray.storage.StoragePath (local or object store)."""
        from leaf_ray.storage import resolve

        return resolve(self.cache_root, "storage.cache_root", self.endpoint_override)

    def runs_location(self):
        """The runs root as a leaf_ray.storage.StoragePath (local or object store)."""
        from leaf_ray.storage import resolve

        return resolve(self.runs_root, "storage.runs_root", self.endpoint_override)

    def local_cache_path(self) -> Path:
        """The local directory for model weights and local copies of remote runs."""
        from leaf_ray.storage import DEFAULT_LOCAL_CACHE, local_root

        if self.local_cache is not None:
            return local_root(self.local_cache, "storage.local_cache")
        return local_root(self.cache_root, "storage.cache_root") or DEFAULT_LOCAL_CACHE.expanduser()

    def cache_path(self) -> Path:
        """cache_root as a local directory; refused for an object store (use cache_location())."""
        return _local_only(self.cache_root, "storage.cache_root")

    def runs_path(self) -> Path:
        """runs_root as a local directory; refused for an object store (use runs_location())."""
        return _local_only(self.runs_root, "storage.runs_root")


def _local_only(root: str, field: str) -> Path:
    from leaf_ray.storage import local_root

    path = local_root(root, field)
    if path is None:
        raise ConfigError(f"{field}: {root!r} is an object store; this step needs a local directory")
    return path


class RunConfig(_Section):
    name: str = "quickstart"
    allow_hub: bool = False  # set true to let models and data fall back to the Hugging Face Hub
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _hub_policy(self) -> RunConfig:
        self.data._allow_hub = self.allow_hub  # data paths follow the same Hub policy as models
        return self

    def model_store(self):
        """The run's models: weights under storage's local cache, the Hub only with allow_hub."""
        from leaf_ray.models import ModelStore

        return ModelStore(self.storage.local_cache_path(), self.allow_hub)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at the section that holds `loc`'s last element."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        current = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields) if current is not None else []


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _field_names(RunConfig, loc), n=1)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
            lines.append(f"  {key}: unknown key{hint}")
        else:
            # The bad value, except where pydantic's input is the enclosing section (a missing key, or a
            # section-level validator): a whole section dict says nothing. A dict given for a scalar is shown.
            section_input = isinstance(err.get("input"), dict) and err["type"] in ("missing", "value_error",
                                                                                   "assertion_error")
            got = f" (got {_SHORT.repr(err['input'])})" if "input" in err and not section_input else ""
            lines.append(f"  {key}: {err['msg']}{got}")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a YAML tree; integer parts index lists (`data.sources.0.limit=100`)."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: '{'.'.join(parts[:depth])}' has {len(node)} items; "
                                  f"'{part}' is not a valid index")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: '{'.'.join(parts[:depth])}' is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides; values are parsed as YAML (`train.lr=3e-4`, `eval.dims=[256,128]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def with_values(cfg: RunConfig, values: dict[str, Any], source: str = "overrides") -> RunConfig:
    """`cfg` with dotted keys set to Python values (`{"train.lr": 3e-4}`), validated like a loaded config;
    errors name the key and `source`."""
    tree = cfg.model_dump()
    for key, value in values.items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (default: configs/quickstart.yaml) and apply overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(tree, overrides or [])
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[RunConfig, Any]:
    """The shared job CLI: `--config FILE` plus `a.b=c` overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args
