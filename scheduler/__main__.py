"""``python -m scheduler``: run the scheduler service against the ``ZW_*`` stack."""

from __future__ import annotations

from zenml_workers.cli import main

if __name__ == "__main__":
    main(["scheduler"])
