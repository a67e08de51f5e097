"""Adapter composition: combine registered LoRA adapters into a new registered one (``adapterhub combine``),
compose them per request (``model: "task-a*0.7+style-b*0.3"``), show the lineage graph and evaluate a
combination on each parent's task.

Modules: :mod:`spec` (parsing compositions and weights), :mod:`cat` (the exact concatenation shared by the
stored ``cat`` method and per-request serving), :mod:`methods` (the other methods, through PEFT),
:mod:`combine` (checks, lineage card, publish), :mod:`lineage` (parents → children), :mod:`evaluate`
(task × adapter table).
"""
