"""Jobs layer: the training runner — recipe checks, data, tasks, methods, the loop, evaluation, registration.

Entry points: :func:`adapterhub_local.train.checks.load_and_check` (recipe file → checked recipe + data) and
:func:`adapterhub_local.train.runner.run` (→ trained, evaluated, registered adapter).
"""
