"""The Celery side of nextpoints-export: it wraps the Celery-free ``stages/`` in tasks and wires them together.

Follow one export through these files:

- ``service.py``     the facade the API and CLI call: start, status, cancel, list, download, rerun from a stage
- ``canvas.py``      the one place the DAG is assembled: discover → chord(convert batches, merge) → compress,
                     and the rest of a failed export from one stage
- ``tasks.py``       the thin task wrappers around ``stages/`` (log context, cancellation, retries, failure report)
- ``retry_policy.py`` which errors retry automatically, and the backoff
- ``config.py``      YAML pipeline configs (``configs/``), validated with pydantic
- ``jobs.py``        the export job record in Redis (status, counts, errors, stop flag)
- ``progress.py``    progress 0-100 and ``current_step`` from the job record and the batches' results
- ``beat.py``        periodic cleanup of old exports and the stale-job check
- ``celery_app.py``  the Celery app and its configuration; ``settings.py`` reads the environment
- ``paths.py``       where an export's files live; ``errors.py`` the facade's exceptions
- ``logging.py``     structlog, configured once per process
- ``cli.py``, ``runner.py``, ``serve.py``, ``embedded.py``  the ``nextpoints-export`` command, its operating
  commands (run a config, retry, status, cancel, list), the one-command service and its private Redis
"""
