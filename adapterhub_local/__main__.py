"""``python -m adapterhub_local`` runs the CLI."""

from adapterhub_local.cli import run

run()
