"""Hugging Face model cards (README.md) for what a run exports: the leaf and the asymmetric pair.

A card is generated, never hand-edited: from the directory's leaf_manifest.json (teacher, student and train
config, prompts, parameter counts, the run's summary) and the run's metric records (leaf_ray.report), so the
Hub's metadata (library, pipeline, base model, teacher, licence, tags, a model-index of the run's own scores)
always says what results.json says, and a re-export rewrites it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from leaf_ray.config import DataConfig
from leaf_ray.report import MODE_ORDER, full_dims_scores, rows_table
from leaf_ray.student import read_manifest

CARD_NAME = "README.md"
# task -> (the metric a card reports, its Hub task type and name, the metric's display name)
CARD_METRICS = {"retrieval": ("ndcg_at_10", "information-retrieval", "Information Retrieval", "nDCG@10"),
                "sts": ("cosine_spearman", "semantic-similarity", "Semantic Similarity", "cosine Spearman")}
CARD_METRIC_OF = {task: spec[0] for task, spec in CARD_METRICS.items()}
ASYMMETRIC = "leaf queries, teacher documents"
TAGS = ["sentence-transformers", "feature-extraction", "leaf", "distillation"]
EXAMPLE_TEXTS = ['queries = ["what does vitamin C do?"]',
                 'documents = ["Vitamin C is an antioxidant found in citrus fruit."]', ""]
# The train config keys a card lists (the rest are placement and logging).
RECIPE_KEYS = ("epochs", "max_steps", "batch_size", "num_workers", "lr", "head_lr", "head_only_steps", "schedule",
               "cycles", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "length_group_batches",
               "padding_buckets", "seed")


def hub_id(name: str | None) -> str | None:
    """`name` when it names a Hub repository, else None: metadata that names models must hold Hub ids (the Hub
    refuses a card whose base_model is a local path), and a run resolves an existing local path first."""
    if not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model(manifest: dict) -> str | None:
    """The model the leaf's encoder started from: the teacher (`teacher_layers`), `student.model` (`pretrained`),
    or none (a `fresh`, randomly initialised encoder)."""
    student = manifest["student"]
    return {"teacher_layers": manifest["teacher"]["model"], "pretrained": student.get("model")}.get(student["kind"])


def eval_results(records: Sequence[dict], modes: Mapping[str, str], data: DataConfig | None = None) -> list[EvalResult]:
    """The model-index entries of `modes` (mode -> metric-type prefix: "" for the model's own mode). Datasets the
    data section mirrors from the Hub (`data.hub`) are named by their Hub id and revision."""
    results = []
    for dataset, split, task, metric, _, by_mode in full_dims_scores(records, CARD_METRIC_OF):
        _, task_type, task_name, label = CARD_METRICS[task]
        hub, _, revision = ((data.hub if data else {}).get(dataset) or "").partition("@")
        for mode in (m for m in MODE_ORDER if m in modes and m in by_mode):
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=hub or dataset, dataset_name=dataset,
                dataset_split=split, dataset_revision=revision or None, metric_type=modes[mode] + metric,
                metric_name=label + (f" (asymmetric: {ASYMMETRIC})" if mode == "asymmetric" else ""),
                metric_value=by_mode[mode]))
    return results


def _card(data: ModelCardData, body: list[str]) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _link(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if hub_id(name) else f"`{name}`"


def _encoder(manifest: dict) -> str:
    student = manifest["student"]
    if student["kind"] == "teacher_layers":
        layers = student["layers"] or f"{student['num_layers']} evenly spaced (first and last kept)"
        return f"layers {layers} of the teacher"
    if student["kind"] == "pretrained":
        return f"the pretrained encoder {_link(student['model'])}"
    return (f"a fresh {student['num_layers']}-layer BERT (hidden size {student['hidden_size']}, random initialisation, "
            "the teacher's tokenizer)")


def _parameters(manifest: dict) -> list[str]:
    counts = manifest["param_counts"]
    rows = [["encoder", f"{counts['encoder']:,}"], ["projection", f"{counts['projection']:,}"],
            ["total", f"{counts['total']:,}"]]
    if counts.get("teacher"):
        rows.append(["teacher", f"{counts['teacher']:,} ({counts['ratio']:.1f}x the leaf)"])
    return ["## Parameters", "", rows_table(["part", "parameters"], rows)]


def _training(manifest: dict, data: DataConfig | None) -> list[str]:
    """The recipe as the manifest and the run's summary record it, and the text mix of the data section."""
    student, teacher, results = manifest["student"], manifest["teacher"], manifest.get("results") or {}
    lines = ["## Training", "",
             f"- Architecture: {_encoder(manifest)} -> mean pooling -> a linear projection to the teacher's "
             f"{teacher['dim']} dims ({student['projection_init']} initialisation) -> L2 normalisation; texts cut at "
             f"{student['max_length']} tokens (the teacher's: {teacher['max_length']})."]
    train = manifest.get("train")
    if train:
        recipe = ", ".join(f"{key}={train[key]}" for key in RECIPE_KEYS if key in train)  # older runs lack some
        lines.append(f"- Objective: {train['loss']} distance to the teacher's normalised vector of each text (no "
                     f"labels); train config: {recipe}.")
    done = results.get("train") or {}
    if "step" in done:
        lines.append(f"- Trained {done['step']:,} steps on {done['samples']:,} texts; validation cosine to the teacher "
                     f"{done['val_cosine']:.4f}.")
    mix = results.get("text_mix")
    if mix:
        kept = ", ".join(f"{n:,} {kind}" for kind, n in mix["kept"].items())
        read = ", ".join(f"{n:,} from {label}" for label, n in mix["read"].items())
        lines.append(f"- Text mix: {kept} texts kept of the rows read ({read}); dropped {mix['dropped_empty']} empty, "
                     f"{mix['dropped_duplicate_text']} duplicate texts, {mix['dropped_duplicate_id']} duplicate ids.")
    if data and data.sources:
        rows = [[s.label, s.path, s.limit, s.limit_queries, s.limit_documents] for s in data.sources]
        lines += ["", "Text sources (the data section of the run config):", "",
                  rows_table(["source", "path", "limit", "queries", "documents"], rows)]
    return lines


def _evaluation(records: Sequence[dict]) -> list[str]:
    scores = full_dims_scores(records, CARD_METRIC_OF)
    if not scores:
        return []
    modes = [m for m in MODE_ORDER if any(m in by_mode for *_, by_mode in scores)]
    header = ["dataset", "split", "metric", "dims", *modes]
    rows = [[dataset, split, CARD_METRICS[task][3], dims, *[by_mode.get(m) for m in modes]]
            for dataset, split, task, _, dims, by_mode in scores]
    dims = sorted({r["dims"] for r in records}, reverse=True)
    return ["## Evaluation", "",
            f"The run's own evaluation, float32 vectors at full size: the teacher alone, the leaf alone (student) and "
            f"asymmetric ({ASYMMETRIC}; for STS the leaf embeds the first sentences, the teacher the second). The "
            f"run's results.json also holds the other metrics, Matryoshka dims {dims} and int8 / binary quantization.",
            "",
            rows_table(header, rows)]


def leaf_card(manifest: dict, records: Sequence[dict], data: DataConfig | None = None,
              license: str | None = None) -> ModelCard:
    """The card of an exported leaf: what it is, its size, how it was trained, its scores, how to use it on its
    own and asymmetrically (leaf queries against teacher documents)."""
    teacher, prompts = manifest["teacher"], manifest["prompts"]
    name = manifest.get("run", "leaf")
    metadata = ModelCardData(
        model_name=name, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        base_model=hub_id(base_model(manifest)), teacher=teacher["model"], license=license,
        tags=TAGS + [t for t in [hub_id(teacher["model"])] if t],
        eval_results=eval_results(records, {"student": "", "asymmetric": "asymmetric_"}, data) or None)
    body = [f"# {name}", "",
            f"A [LEAF](https://arxiv.org/abs/2509.12539) leaf of {_link(teacher['model'])}, distilled with leaf-ray: "
            f"a small encoder trained to reproduce the teacher's {teacher['dim']}-d embeddings, so its vectors live in "
            "the teacher's space. Queries embedded by the leaf can be searched against documents the teacher embedded "
            "(asymmetric mode), and the teacher's Matryoshka truncation and int8 / binary quantization carry over.",
            "", *_parameters(manifest), *_training(manifest, data), "", *_evaluation(records),
            "## Usage", "",
            f"The leaf carries the teacher's prompts (query {prompts.get('query', '')!r}, document "
            f"{prompts.get('document', '')!r}); `encode_query` / `encode_document` apply them.", "",
            "```python", "from sentence_transformers import SentenceTransformer", "", *EXAMPLE_TEXTS,
            f'leaf = SentenceTransformer("path/to/{name}")  # this folder, or the Hub id it was pushed to',
            "print(leaf.similarity(leaf.encode_query(queries), leaf.encode_document(documents)))", "```", "",
            "Asymmetric mode: documents stay embedded by the teacher, prompted, cut and normalised as the evaluation "
            "did, and only queries go through the leaf:", "",
            "```python",
            f'teacher = SentenceTransformer("{teacher["model"]}")',
            f"teacher.max_seq_length = {teacher['max_length']}",
            f"document_vectors = teacher.encode_document(documents, prompt={teacher['document_prompt']!r}, "
            "normalize_embeddings=True)",
            "print(leaf.similarity(leaf.encode_query(queries), document_vectors))", "```"]
    return _card(metadata, body)


def write_leaf_card(student_dir: str | Path, records: Sequence[dict], data: DataConfig | None = None,
                    license: str | None = None) -> Path:
    """README.md in an exported leaf's directory, from its manifest and the run's records."""
    path = Path(student_dir) / CARD_NAME
    leaf_card(read_manifest(student_dir), records, data, license).save(path)
    return path


def asymmetric_card(manifest: dict, records: Sequence[dict], data: DataConfig | None = None,
                    license: str | None = None) -> ModelCard:
    """The card of the asymmetric pair (leaf_ray.asym) built from the leaf's manifest: its own scores are the
    run's asymmetric-mode records."""
    teacher, counts = manifest["teacher"], manifest["param_counts"]
    name = f"{manifest.get('run', 'leaf')}-asym"
    metadata = ModelCardData(
        model_name=name, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        base_model=hub_id(teacher["model"]), teacher=teacher["model"], license=license,
        tags=TAGS + ["asymmetric"] + [t for t in [hub_id(teacher["model"])] if t],
        eval_results=eval_results(records, {"asymmetric": ""}, data) or None)
    teacher_size = f"{counts['teacher']:,} parameters" if counts.get("teacher") else "the teacher's parameters"
    query_prompt = manifest["prompts"].get("query", teacher["query_prompt"])  # as leaf_ray.asym prompts it
    body = [f"# {name}", "",
            f"A [LEAF](https://arxiv.org/abs/2509.12539) leaf and its teacher {_link(teacher['model'])} as one "
            "sentence-transformers model: a `Router` sends queries to the leaf "
            f"({counts['total']:,} parameters) and documents to the teacher ({teacher_size}), both L2-normalised "
            f"{teacher['dim']}-d vectors of the teacher's space. Queries are cheap to embed at search time, while "
            "documents keep the teacher's quality.", "",
            f"`encode_query` prompts with {query_prompt!r} and `encode_document` with the teacher's document prompt "
            f"{teacher['document_prompt']!r}, so they give the vectors the run's asymmetric mode was evaluated with.",
            "", *_evaluation(records),
            "## Usage", "",
            "```python", "from sentence_transformers import SentenceTransformer", "", *EXAMPLE_TEXTS,
            f'model = SentenceTransformer("path/to/{name}")  # this folder, or the Hub id it was pushed to',
            "query_vectors = model.encode_query(queries)  # the leaf",
            "document_vectors = model.encode_document(documents)  # the teacher",
            "print(model.similarity(query_vectors, document_vectors))", "```"]
    return _card(metadata, body)
