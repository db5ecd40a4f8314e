from tests.services.s3 import s3_server  # noqa: F401
