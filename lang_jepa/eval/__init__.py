"""Representation evaluation: ``python -m lang_jepa.eval RUN_DIR_OR_EXPORT`` (see ``__main__``).

Modules: :mod:`.metrics` (pure metric functions), :mod:`.predictor` (masked-sentence retrieval
vs the does-it-use-the-context controls; :func:`quick_eval` for the training loop),
:mod:`.tasks` (Lee50, Rotten Tomatoes probe, health; the embedders and baselines),
:mod:`.loading` (run / export directories), :mod:`.suite` (everything together),
:mod:`.output` (eval.json, eval.md, PNGs), :mod:`.fetch_data` (the RT csv).
"""

from .predictor import quick_eval

__all__ = ["quick_eval"]
