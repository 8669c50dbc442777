"""Teacher sources: where the teacher's supervision comes from.

* :mod:`~betakd.teachers.protocol`: the protocol the trainer calls (``TeacherSource``,
  ``TeacherTargets``, ``BatchMeta``);
* :mod:`~betakd.teachers.targets`: the forms of per-token targets (logits, hidden
  states + lm_head, top-k + tail) and the tail rule;
* :mod:`~betakd.teachers.online`: a frozen model run on every step;
* :mod:`~betakd.teachers.ensemble`: several named sources at once (multi-teacher);
* :mod:`~betakd.teachers.served`: a teacher on a vLLM server (``ServedTeacher``), which
  :mod:`~betakd.teachers.vllm_client` talks to (``TeacherServer``);
* the offline cache: :mod:`~betakd.teachers.cache_format` (layout, ids, fingerprint),
  :mod:`~betakd.teachers.cache_writer` (run the teacher once),
  :mod:`~betakd.teachers.cache_reader` (``TeacherCache``, ``CachedTeacher``);
* :mod:`~betakd.teachers.build`: the config's teacher plans -> sources (every command
  builds its teachers there).
"""

from __future__ import annotations

import importlib

# Name -> submodule. Loaded on first use, so that importing a light submodule (the
# cache defaults the command line shows) does not import torch through this package.
_EXPORTS = {
    "BatchMeta": "protocol",
    "CacheContents": "cache_format",
    "CacheError": "cache_format",
    "CachedSample": "cache_reader",
    "CachedTeacher": "cache_reader",
    "DenseLogits": "targets",
    "HiddenStateLogits": "targets",
    "OnlineTeacher": "online",
    "ServedTeacher": "served",
    "ServedTeacherError": "vllm_client",
    "TeacherServer": "vllm_client",
    "TeacherCache": "cache_reader",
    "TeacherEnsemble": "ensemble",
    "TeacherSource": "protocol",
    "TeacherTargets": "protocol",
    "TopKLogits": "targets",
    "dense_from_topk": "targets",
    "topk_summary": "targets",
    "write_cache": "cache_writer",
    "CacheSource": "cache_writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'betakd.teachers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"betakd.teachers.{_EXPORTS[name]}"), name)
