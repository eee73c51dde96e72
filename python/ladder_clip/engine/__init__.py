"""The engine layer: recipes, the validated configs, checkpoint files, the run folder's state, evaluation,
the metrics a run writes, and training; it imports the layers below it (base, data, model, methods). Light
on purpose: config.py (standard library only) is read by the CLI before main() runs."""
