"""Teacher backends, the Ray Data embedding stage and its parquet cache."""

from leaf_ray.teacher.cache import CacheMismatchError, TeacherCache
from leaf_ray.teacher.stage import build_cache, embed_dataset, teacher_embeddings

__all__ = ["CacheMismatchError", "TeacherCache", "build_cache", "embed_dataset", "teacher_embeddings"]
