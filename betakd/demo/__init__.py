"""The `betakd demo`: Beta-KD on easy-VQA with controlled uncertainty, on a CPU in minutes.

* :mod:`betakd.demo.scenario`: the interface every scenario implements
  (:class:`~betakd.demo.scenario.Scenario`) and the driver they all run through
  (settings, data, teachers, worker pool, results.json, report, failures);
* :mod:`betakd.demo.run`: the default scenario (several weightings, seeds, a report)
  and what one run of any scenario is made of (its ``betakd train`` config, its
  training in a worker, the teacher's offline cache);
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
  :mod:`betakd.demo.report` (the default report and the helpers every report shares).
"""
