"""Teacher sources: where the teacher's supervision comes from.

* :mod:`~betakd.teachers.protocol`: the protocol the trainer calls (``TeacherSource``,
  ``TeacherTargets``, ``BatchMeta``);
* :mod:`~betakd.teachers.targets`: the forms of per-token targets (logits, hidden
  states + lm_head, top-k + tail) and the tail rule;
* :mod:`~betakd.teachers.online`: a frozen model run on every step;
* :mod:`~betakd.teachers.ensemble`: several named sources at once (multi-teacher);
* the offline cache: :mod:`~betakd.teachers.cache_format` (layout, ids, fingerprint),
  :mod:`~betakd.teachers.cache_writer` (run the teacher once),
  :mod:`~betakd.teachers.cache_reader` (``TeacherCache``, ``CachedTeacher``).
"""

from betakd.teachers.cache_format import CacheContents, CacheError
from betakd.teachers.cache_reader import CachedSample, CachedTeacher, TeacherCache
from betakd.teachers.cache_writer import write_cache
from betakd.teachers.ensemble import TeacherEnsemble
from betakd.teachers.online import OnlineTeacher
from betakd.teachers.protocol import BatchMeta, TeacherSource, TeacherTargets
from betakd.teachers.targets import (
    DenseLogits,
    HiddenStateLogits,
    TopKLogits,
    dense_from_topk,
    topk_summary,
)

__all__ = [
    "BatchMeta",
    "CacheContents",
    "CacheError",
    "CachedSample",
    "CachedTeacher",
    "DenseLogits",
    "HiddenStateLogits",
    "OnlineTeacher",
    "TeacherCache",
    "TeacherEnsemble",
    "TeacherSource",
    "TeacherTargets",
    "TopKLogits",
    "dense_from_topk",
    "topk_summary",
    "write_cache",
]
