"""Opt-in tools above the core: nothing in the engine imports them.

* :mod:`dp_microclip.tools.diagnostics`: observers that show what clipping does to each
  step (:class:`~dp_microclip.tools.diagnostics.ClipMonitor`) and which examples it mutes
  (:class:`~dp_microclip.tools.diagnostics.DraggerProbe`).
* :mod:`dp_microclip.tools.sweep`: fair comparisons of the clipping methods against plain
  training, each with its own tuned learning rate (``dp-microclip sweep``);
  :mod:`dp_microclip.tools.sweep_report` turns a sweep into tables and plots.
* :mod:`dp_microclip.tools.audit`: the one-run empirical privacy audit of the engine's
  epsilon (``dp-microclip audit``); its statistics live in the torch-free
  :mod:`accounting.audit`.

Import the module you need, e.g. ``from dp_microclip.tools.diagnostics import ClipMonitor``.
"""
