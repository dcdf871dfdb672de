"""IMP (arXiv 2305.06324, SPEC.md §4): alternating gradient descent over tasks with a shared
encoder, as a project on the shared pieces: model.py (embedders, encoder, heads), losses.py
(task losses), tasks.py (each task's batches), schedules.py (which task a step takes),
train.py, evaluate.py, validate.py, and trainer.py (its entry in trainers.py)."""
