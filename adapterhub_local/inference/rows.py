"""The row ledger: the one owner of the lifecycle of open-batch rows and of the adapter busy counts they imply.

A row of an open decode batch (:mod:`continuous`) goes through::

    admit ──► (decoding) ──► finished or aborted ──► release

``admit`` records the row and, for a LoRA row, holds its adapter busy (never evicted from the pool; merge
and unload are refused while any row holds it). A row that finished or was aborted stays admitted until
``release``, because its KV-cache row and adapter slot are still in the batch's tensors; releasing it is the
batch's job (when it reclaims cache rows, when a row leaves, when the batch closes). Invariants, checked by
:meth:`RowLedger.check` and enforced on every call:

* a row is admitted once and released once (a second admit or a release of an unknown row is a bug);
* an adapter's busy count equals the admitted rows that use it, and no count is ever zero or negative;
* ``open_rows`` equals the admitted rows.

So "nothing is left behind" is one statement: after every open batch has closed, the ledger is empty.
"""

from __future__ import annotations

from collections import Counter
from itertools import count


class RowLedger:
    """Admitted rows (``(batch, key)`` → LoRA ref or ``None``) and the per-adapter busy counts they imply."""

    def __init__(self) -> None:
        self._rows: dict[tuple[int, int], str | None] = {}
        self._busy: Counter[str] = Counter()
        self._batches = count(1)

    def new_batch(self) -> int:
        """A fresh owner id for an open batch's rows."""
        return next(self._batches)

    def admit(self, batch: int, key: int, lora: str | None) -> None:
        """Record a row of ``batch``; a LoRA row holds ``lora`` busy until :meth:`release`."""
        assert (batch, key) not in self._rows, f"row {key} of batch {batch} admitted twice"
        self._rows[(batch, key)] = lora
        if lora is not None:
            self._busy[lora] += 1

    def release(self, batch: int, key: int) -> None:
        """Forget a row (finished, aborted or left) and drop its hold on its adapter."""
        assert (batch, key) in self._rows, f"row {key} of batch {batch} released but not admitted"
        lora = self._rows.pop((batch, key))
        if lora is not None:
            self._busy[lora] -= 1
            if self._busy[lora] == 0:
                del self._busy[lora]

    def holds(self, batch: int, key: int) -> bool:
        return (batch, key) in self._rows

    @property
    def open_rows(self) -> int:
        """Admitted rows, over every open batch."""
        return len(self._rows)

    def busy(self, ref: str) -> int:
        """Rows holding adapter ``ref``."""
        return self._busy.get(ref, 0)

    def busy_counts(self) -> dict[str, int]:
        """A copy: adapter → rows holding it (only adapters with at least one)."""
        return dict(self._busy)

    def check(self) -> None:
        """Assert the invariants (see the module docstring)."""
        expected = Counter(lora for lora in self._rows.values() if lora is not None)
        assert expected == self._busy, f"busy counts {dict(self._busy)} disagree with the rows {dict(expected)}"
        assert all(n > 0 for n in self._busy.values()), f"non-positive busy count in {dict(self._busy)}"
