"""Real service processes (Redis, PostgreSQL, SeaweedFS, Celery workers, Flower).

Each module has a plain ``start_*`` function (no pytest needed; ``bench/`` uses them) and
thin pytest fixtures around it. Fixtures start a service only when a test asks for it, so
``pytest tests/unit`` needs none. In CI (``CI=true``) a missing service fails the test;
elsewhere it is skipped.
"""
