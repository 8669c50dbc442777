"""The `betakd demo`: Beta-KD on easy-VQA with controlled uncertainty, on a CPU in minutes.

* :mod:`betakd.demo.run`: the default scenario (several weightings, seeds, a report)
  and the jobs, worker pool and results every scenario shares;
* scenarios: :mod:`~betakd.demo.two_teachers`, :mod:`~betakd.demo.on_policy`,
  :mod:`~betakd.demo.cross_tokenizer`, :mod:`~betakd.demo.feature_channel`;
* :mod:`betakd.demo.config`: the demo's design (``defaults.yaml``) with ``--set``
  overrides; :mod:`betakd.demo.strategies`: what each named run hands to ``betakd train``;
* :mod:`betakd.demo.easyvqa_data`: easy-VQA -> LLaVA JSONL + image folder, with
  label noise and a teacher-blind slice recorded per sample under ``meta``;
* :mod:`betakd.demo.teacher`: the tiny LLaVA teacher and student, trained, evaluated
  and cached;
* :mod:`betakd.demo.evaluation` (accuracy and betas by slice),
  :mod:`betakd.demo.diagnostics` (per-slice training diagnostics),
  :mod:`betakd.demo.audit` (the data audited before the runs) and
  :mod:`betakd.demo.report` (tables, plots, what won).
"""
