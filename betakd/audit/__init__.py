"""`betakd audit`: where the teachers and the labels are probably wrong, before training.

* :mod:`~betakd.audit.scores`: every sample's teacher NLLs, h(x) and teacher answers,
  from the training code, resumable;
* :mod:`~betakd.audit.analysis`: the teacher reliability's posteriors, the configured
  trust, slices by metadata, rankings;
* :mod:`~betakd.audit.report`: audit.json, report.md, a plot;
* :mod:`~betakd.audit.run`: the recipe (config -> trainer -> scores -> report);
* :mod:`~betakd.audit.cli`: the command.
"""
