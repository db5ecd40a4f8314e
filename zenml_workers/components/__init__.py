"""Optional stack components: experiment trackers, data validators and the interface they share.

``base.py`` holds the interface (:class:`~zenml_workers.components.base.StackComponent` and its
kinds), ``registry.py`` the known flavors, ``lifecycle.py`` the worker's hooks around a step,
``mlflow_tracker.py`` the MLflow experiment tracker and ``client.py`` what ``Client`` shows.
Nothing here is imported by ``import zenml_workers``.
"""
