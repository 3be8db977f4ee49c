"""Pure conversion code: input sources, output formats and the four stage functions.

Nothing in this package imports Celery, FastAPI or Redis, so every stage runs and is tested without a broker
and serves as the serial baseline the Celery pipeline is measured against.
"""
