"""``python -m zenml_workers.cli``: the ``zw`` command."""

from zenml_workers.cli import main

main()
