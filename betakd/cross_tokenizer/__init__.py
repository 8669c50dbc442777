"""Distillation from a teacher with another tokenizer: answers aligned by text
(:mod:`.alignment`), the shared part of the vocabularies (:mod:`.vocabulary`) and
per-group energies (:mod:`.group_loss`)."""
