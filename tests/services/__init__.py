"""Real service processes (Redis, PostgreSQL, Celery workers, Flower) for integration tests.

Fixtures start a service only when a test asks for it, so ``pytest tests/unit`` needs none.
In CI (``CI=true``) a missing service fails the test; elsewhere it is skipped.
"""
