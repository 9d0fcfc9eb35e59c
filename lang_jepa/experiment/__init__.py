"""The experiment harness: ``python -m lang_jepa.experiment experiments/NAME.yaml``.

An experiment file names a base config, variants (a name and dotted overrides each; ``train:
false`` for the random-init control), a budget in tokens, seeds and evaluation settings. Every
variant x seed trains with the real engine (``train.py`` as a subprocess) into
``runs/experiments/NAME/VARIANT-sSEED``, is exported and scored by the evaluation suite at
``eval.points`` checkpoints along the budget; ``results.json``, ``results.md`` and
``results.png`` aggregate them over seeds.

Modules: :mod:`.spec` (the file, its checks, budget -> steps), :mod:`.cell` (train, export,
evaluate one variant x seed), :mod:`.runner` (order, skip finished cells, progress),
:mod:`.results` (aggregation, tables, plot).
"""

from .spec import Experiment, ExperimentError, load_experiment

__all__ = ["Experiment", "ExperimentError", "load_experiment"]
