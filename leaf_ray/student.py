"""The student ("leaf"): a transformer encoder -> mean pooling -> linear map into the teacher's space -> L2 norm.

The encoder comes from one of three places (`student.kind`):
- `pretrained`: any encoder by hub id or path (e.g. all-MiniLM-L6-v2 under an mpnet teacher);
- `teacher_layers`: a copy of the teacher that keeps chosen layers (DistilBERT-style), so it starts out
  close to the teacher's space;
- `fresh`: a new BERT of the configured size that reuses the teacher's tokenizer.

The student is a plain sentence-transformers model made of built-in modules only, with the teacher's
query/document prompts stored as its named prompts, so an exported directory loads with
`SentenceTransformer(path)` without leaf_ray and `encode(..., prompt_name="query")` does what training did.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

from leaf_ray.config import StudentConfig, TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.models import ModelStore, check_model_dir
from leaf_ray.teacher.cache import embedding_matrix

MANIFEST_NAME = "leaf_manifest.json"
MANIFEST_FORMAT = "leaf-ray-student/1"
# Where encoders keep their stack of transformer blocks (BERT/RoBERTa/MPNet, DistilBERT, ModernBERT-like).
LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers")


class StudentError(LeafRayError, ValueError):
    """A student that cannot be built or exported as configured; the message names the config field."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a student, and the teacher's when known (the paper's "4.7x smaller")."""

    encoder: int
    projection: int
    total: int
    teacher: int | None = None

    @property
    def ratio(self) -> float | None:
        """Teacher parameters per student parameter."""
        return self.teacher / self.total if self.teacher else None

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def teacher_prompts(teacher: TeacherConfig) -> dict[str, str]:
    """The teacher's prompts, keyed by text kind: the student sees exactly the text the teacher saw."""
    return {"query": teacher.query_prompt, "document": teacher.document_prompt}


def prompted_texts(model: SentenceTransformer, texts, kinds) -> list[str]:
    """Prefix each text with the model's prompt for its kind (what `encode(prompt_name=kind)` does)."""
    prompts = model.prompts or {}
    return [prompts.get(kind, "") + text for text, kind in zip(texts, kinds)]


def forward_texts(model: SentenceTransformer, texts, kinds, forward=None) -> torch.Tensor:
    """Tokenise prompted texts and run `forward` (the model itself, or its DDP wrapper) on them; returns
    the model's sentence embeddings on the model's device."""
    features = model.preprocess(prompted_texts(model, texts, kinds))
    device = next(model.parameters()).device
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return (forward or model)(features)["sentence_embedding"]


def transformer_dir(model_dir: Path) -> Path:
    """The Hugging Face model inside a sentence-transformers directory (the root for most models)."""
    modules = model_dir / "modules.json"
    if modules.is_file():
        for entry in json.loads(modules.read_text()):
            if entry.get("type", "").endswith("Transformer"):
                return model_dir / entry.get("path", "")
    return model_dir


def _source_dir(name: str, trust_remote_code: bool, allow_pickle: bool, models: ModelStore) -> Path:
    path = models.resolve(name)
    check_model_dir(path, trust_remote_code, allow_pickle)
    return path


def load_flags(cfg: StudentConfig, teacher: TeacherConfig) -> tuple[bool, bool]:
    """(trust_remote_code, allow_pickle_weights) of the model the encoder is made from (the student's own
    settings for `pretrained`, the teacher's for students cut from it)."""
    if cfg.kind == "pretrained":
        return cfg.trust_remote_code, cfg.allow_pickle_weights
    return teacher.trust_remote_code, teacher.allow_pickle_weights


def _layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    for dotted in LAYER_PATHS:
        *parents, attr = dotted.split(".")
        parent = model
        for part in parents:
            parent = getattr(parent, part, None)
        layers = getattr(parent, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return parent, attr, layers
    raise StudentError(f"student.kind 'teacher_layers': cannot find the layer stack of {type(model).__name__} "
                       f"(looked for {', '.join(LAYER_PATHS)}); use kind 'pretrained' or 'fresh'")


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total`, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, min(keep, total))})


def _teacher_subset(teacher_dir: Path, cfg: StudentConfig, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(teacher_dir, use_safetensors=not allow_pickle,
                                      trust_remote_code=trust_remote_code)
    parent, attr, layers = _layer_list(model)
    keep = cfg.layers if cfg.layers is not None else evenly_spaced_layers(len(layers), cfg.num_layers)
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if not keep or bad or len(set(keep)) != len(keep):
        raise StudentError(f"student.layers {keep} must be distinct indices in [0, {len(layers)}) "
                           f"(the teacher has {len(layers)} layers)")
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    return model


def _fresh_bert(cfg: StudentConfig, tokenizer):
    from transformers import BertConfig, BertModel

    if cfg.hidden_size % cfg.num_heads:
        raise StudentError(f"student.hidden_size ({cfg.hidden_size}) must be divisible by "
                           f"student.num_heads ({cfg.num_heads})")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=max(512, cfg.max_length),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return BertModel(config)


def build_encoder(cfg: StudentConfig, teacher: TeacherConfig, models: ModelStore) -> Transformer:
    """The student's Transformer module, built as `cfg.kind` says (see the module docstring)."""
    trust, pickle_ok = load_flags(cfg, teacher)
    source = _source_dir(cfg.model if cfg.kind == "pretrained" else teacher.model, trust, pickle_ok, models)
    kwargs = dict(max_seq_length=cfg.max_length,
                  model_kwargs={"use_safetensors": not pickle_ok, "trust_remote_code": trust},
                  processor_kwargs={"trust_remote_code": trust}, config_kwargs={"trust_remote_code": trust})
    if cfg.kind == "pretrained":
        return Transformer(str(transformer_dir(source)), **kwargs)
    from transformers import AutoTokenizer

    source = transformer_dir(source)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    model = (_teacher_subset(source, cfg, trust, pickle_ok) if cfg.kind == "teacher_layers"
             else _fresh_bert(cfg, tokenizer))
    with tempfile.TemporaryDirectory(prefix="leaf-student-") as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        return Transformer(work, **kwargs)


@dataclass
class TeacherRows:
    """Texts with their kinds and teacher vectors: a projection-fit sample or a validation set."""

    texts: list[str]
    kinds: list[str]
    vectors: np.ndarray

    @classmethod
    def of(cls, rows) -> TeacherRows:
        """From a pyarrow table or a dict of columns (a numpy batch), each with text, kind, embedding."""
        if isinstance(rows, cls):
            return rows
        column = (lambda name: rows.column(name).to_pylist()) if isinstance(rows, pa.Table) else (
            lambda name: [str(v) for v in rows[name]])
        return cls(column("text"), column("kind"), embedding_matrix(rows["embedding"]))

    def __len__(self) -> int:
        return len(self.texts)

    def slice(self, start: int, stop: int | None = None, step: int = 1) -> TeacherRows:
        part = slice(start, stop, step)
        return TeacherRows(self.texts[part], self.kinds[part], self.vectors[part])


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean feature variance


def _ridge_solve(a: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = a.T @ a
    reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=a.dtype)
    reg[-1, -1] = 0.0  # the bias is not shrunk
    return torch.linalg.solve(gram + reg, a.T @ y)


@torch.no_grad()
def fit_projection_lstsq(pooled: np.ndarray, targets: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least-squares weight (out, in) and bias (out,) mapping pooled student vectors onto unit-normalised
    teacher vectors. The ridge strength is the one of RIDGES whose fit on four fifths of the sample lands
    closest (after normalising) to the teacher on the remaining fifth: with fewer samples than dimensions an
    unregularised fit memorises the sample and generalises badly."""
    x = torch.as_tensor(pooled, dtype=torch.float64)
    y = torch.nn.functional.normalize(torch.as_tensor(targets, dtype=torch.float64), dim=-1)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    held, fit = order[: len(a) // 5], order[len(a) // 5:]

    def held_out_error(ridge: float) -> float:
        predicted = torch.nn.functional.normalize(a[held] @ _ridge_solve(a[fit], y[fit], ridge), dim=-1)
        return (predicted - y[held]).pow(2).sum(-1).mean().item()

    ridge = min(RIDGES, key=held_out_error) if len(held) else RIDGES[0]
    solution = _ridge_solve(a, y, ridge)
    return solution[:-1].T.float().numpy(), solution[-1].float().numpy()


def init_projection(cfg: StudentConfig, body: SentenceTransformer, teacher_dim: int, sample=None) -> Dense:
    """The Dense(student_dim -> teacher_dim) head, `random` or `lstsq` (`student.projection_init`).

    lstsq is the default because a random head points the student's vectors in arbitrary directions of
    the teacher's space: the first stretch of training is spent only learning that rotation, and the
    gradients the encoder gets through a random head meanwhile scramble what it already knows. Fitting the
    head by least squares on a sample of (text, teacher vector) rows starts training at the best linear
    alignment of the current encoder: a much lower initial loss, useful encoder gradients from step one.
    It costs one forward pass over `student.projection_init_samples` rows.
    """
    dim = body.get_embedding_dimension()
    if cfg.projection_init == "random":
        return Dense(dim, teacher_dim, bias=True, activation_function=torch.nn.Identity())
    if sample is None or len(sample) == 0:
        raise StudentError("student.projection_init is 'lstsq' but no sample of teacher vectors was given; "
                           "pass cached rows or set student.projection_init: random")
    sample = TeacherRows.of(sample).slice(0, cfg.projection_init_samples)
    body.eval()
    with torch.no_grad():
        pooled = torch.cat([forward_texts(body, part.texts, part.kinds).float().cpu()
                            for part in (sample.slice(i, i + 64) for i in range(0, len(sample), 64))]).numpy()
    weight, bias = fit_projection_lstsq(pooled, sample.vectors)
    return Dense(dim, teacher_dim, bias=True, activation_function=torch.nn.Identity(),
                 init_weight=torch.from_numpy(weight), init_bias=torch.from_numpy(bias))


def build_student(cfg: StudentConfig, teacher: TeacherConfig, teacher_dim: int, *, sample=None,
                  models: ModelStore = ModelStore(), seed: int = 0) -> SentenceTransformer:
    """Encoder -> mean Pooling -> Dense(student dim -> teacher_dim, identity, bias) -> Normalize, on CPU,
    carrying the teacher's prompts. `sample` (TeacherRows, or a table/batch with text, kind, embedding) feeds
    the lstsq head."""
    torch.manual_seed(seed)
    encoder = build_encoder(cfg, teacher, models)
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    prompts = teacher_prompts(teacher)
    body = SentenceTransformer(modules=[encoder, pooling], prompts=prompts, device="cpu")
    head = init_projection(cfg, body, teacher_dim, sample)
    return SentenceTransformer(modules=[encoder, pooling, head, Normalize()], prompts=prompts, device="cpu")


def load_student(path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> SentenceTransformer:
    """Load a student directory (an export or a training checkpoint) with safetensors weights only."""
    return SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=trust_remote_code,
                               model_kwargs={"use_safetensors": True})


def freeze_unused_parameters(model: SentenceTransformer) -> list[str]:
    """Stop gradients for parameters the embedding does not depend on (e.g. BERT's pooler head) and
    return their names: DDP refuses parameters that never receive a gradient."""
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    forward_texts(model, ["a", "b c"], ["query", "document"]).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def count_parameters(model: SentenceTransformer, teacher_params: int | None = None) -> ParamCounts:
    encoder = sum(p.numel() for p in model[0].parameters())
    projection = sum(p.numel() for m in model if isinstance(m, Dense) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(encoder, projection, total, teacher_params)


def safetensors_parameter_count(model_dir: Path) -> int:
    """Parameters stored in a directory's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(int(np.prod(handle.get_slice(key).get_shape())) for key in handle.keys())
    return total


def teacher_parameter_count(teacher: TeacherConfig, models: ModelStore) -> int:
    return safetensors_parameter_count(models.resolve(teacher.model))


def student_manifest(cfg: StudentConfig, teacher: TeacherConfig, teacher_dim: int,
                     teacher_params: int | None) -> dict:
    """What a student directory records about where it came from (the full teacher config, so evaluation
    embeds documents exactly as training did); results are filled in later."""
    return {
        "teacher": {**teacher.model_dump(), "dim": teacher_dim, "params": teacher_params},
        "student": cfg.model_dump(),
        "results": {},
    }


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST_NAME).read_text())


def check_portable(path: Path) -> None:
    """An export must load without leaf_ray and must not hold pickle weights: every module, including those
    inside a Router's routes, is a sentence-transformers built-in."""
    types = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    for router in path.rglob("router_config.json"):
        types += json.loads(router.read_text())["types"].values()
    foreign = [t for t in types if not t.startswith("sentence_transformers.")]
    pickles = [str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if foreign or pickles:
        raise StudentError(f"export at {path} is not portable: non-built-in modules {foreign}, pickle files {pickles}")


@contextmanager
def replaced_atomically(out_dir: Path):
    """A scratch directory beside `out_dir` that replaces it when the block succeeds and is removed when it
    fails: a reader never finds a half-written model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield work
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_student(model: SentenceTransformer, out_dir: str | Path, manifest: dict) -> Path:
    """Write `model` as a sentence-transformers directory (safetensors only) plus `leaf_manifest.json`
    (the given manifest with prompts and parameter counts added), replacing `out_dir` atomically. The model
    card (README.md) comes with the run's results (leaf_ray.model_card)."""
    out_dir = Path(out_dir)
    with replaced_atomically(out_dir) as work:
        model.save(str(work), safe_serialization=True, create_model_card=False)
        check_portable(work)
        teacher_params = (manifest.get("teacher") or {}).get("params")
        full = {"format": MANIFEST_FORMAT, "results": {}, **manifest, "prompts": dict(model.prompts or {}),
                "param_counts": count_parameters(model, teacher_params).as_dict()}
        (work / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=True))
    return out_dir


def update_manifest(path: str | Path, **fields) -> dict:
    """Add results (or other fields) to an exported student's manifest, atomically."""
    manifest = read_manifest(path) | fields
    target = Path(path) / MANIFEST_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, target)
    return manifest
