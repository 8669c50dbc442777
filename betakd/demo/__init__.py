"""The `betakd demo`: Beta-KD on easy-VQA with controlled uncertainty, on a CPU in minutes.

* :mod:`betakd.demo.easyvqa_data`: easy-VQA -> LLaVA JSONL + image folder, with
  label noise and a teacher-blind slice recorded per sample under ``meta``.
* :mod:`betakd.demo.teacher`: the demo design (``defaults.yaml``), the offline
  tokenizer, the tiny LLaVA teacher / student builders, and the cached teacher.
"""
