"""The asymmetric pair as one model: a sentence-transformers Router that sends queries to the leaf and documents
to the teacher (the shape of MongoDB/mdbr-leaf-ir-asym), so one directory serves asymmetric mode through
`encode_query` / `encode_document`.

Each route is that model's own modules without its final Normalize, and one Normalize follows the Router; the
package's prompts are the leaf's query prompt and the teacher's document prompt. Those are the vectors asymmetric
mode is scored on (leaf_ray.evaluate: each side prompted for its kind, L2-normalised): exactly so against a teacher
cache the transformers backend wrote in float32, up to their numerics for other backends and dtypes. Like a leaf it
holds built-in modules and safetensors only, so `SentenceTransformer(path)` loads it without leaf_ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Router

from leaf_ray.config import DataConfig, TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.evaluate import student_prompts
from leaf_ray.model_card import CARD_NAME, asymmetric_card
from leaf_ray.models import ModelStore, inspect_model_dir
from leaf_ray.student import check_portable, read_manifest, replaced_atomically

ASYM_DIR = "asym"  # in the run folder, beside student/


class AsymmetricExportError(LeafRayError, ValueError):
    """A leaf and teacher that cannot become one portable model; the message names the model."""


def _unnormalised(model: SentenceTransformer) -> list:
    """The model's modules without its trailing Normalize: the package normalises both routes once."""
    modules = list(model)
    while modules and isinstance(modules[-1], Normalize):
        modules.pop()
    return modules


def asymmetric_model(leaf: SentenceTransformer, teacher: SentenceTransformer,
                     teacher_cfg: TeacherConfig) -> SentenceTransformer:
    """Router(query: the leaf, document: the teacher) -> Normalize, with the prompts evaluation gives each side:
    the leaf's own query prompt (else the teacher's) and the teacher's document prompt."""
    prompts = {"query": student_prompts(leaf, teacher_cfg)["query"], "document": teacher_cfg.document_prompt}
    router = Router.for_query_document(query_modules=_unnormalised(leaf), document_modules=_unnormalised(teacher))
    return SentenceTransformer(modules=[router, Normalize()], prompts=prompts, device="cpu")


def export_asymmetric(leaf_dir: str | Path, teacher: TeacherConfig, out_dir: str | Path, models: ModelStore,
                      records: Sequence[dict] = (), data: DataConfig | None = None,
                      license: str | None = None) -> Path:
    """Write the pair of the exported leaf at `leaf_dir` and `teacher` (loaded from `models` as the teacher stage
    loads it) to `out_dir`, replaced atomically, with a model card from the leaf's manifest and the run's
    `records`. Models that ship their own code are refused: the package must load with trust_remote_code off."""
    leaf_dir = Path(leaf_dir)
    for name in (str(leaf_dir), teacher.model):
        if inspect_model_dir(models.resolve(name)).remote_code:
            raise AsymmetricExportError(f"export.asymmetric: {name} ships its own code (auto_map / *.py), and the "
                                        "asymmetric package must load with plain SentenceTransformer(path); turn "
                                        "export.asymmetric off for this run")
    leaf = models.load(str(leaf_dir))
    teacher_model = models.load(teacher.model, max_length=teacher.max_length,
                                allow_pickle_weights=teacher.allow_pickle_weights)
    model = asymmetric_model(leaf, teacher_model, teacher)
    out_dir = Path(out_dir)
    with replaced_atomically(out_dir) as work:
        model.save(str(work), safe_serialization=True, create_model_card=False)
        check_portable(work)
        asymmetric_card(read_manifest(leaf_dir), records, data, license).save(work / CARD_NAME)
    return out_dir
