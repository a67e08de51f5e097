"""Parity checks: the engine against PEFT on a registered adapter (:mod:`.parity`), recorded in an append-only
sidecar (:mod:`.sidecar`). Import the submodules directly: the sidecar is light, the check loads the engine."""
