# One image for every service of docker-compose.yml (api, worker, beat, flower); `serve` by default.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    NPX_DATA_ROOT=/data NPX_EXPORT_ROOT=/exports NPX_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stages ./stages
COPY pipeline ./pipeline
COPY api ./api
COPY configs ./configs
# editable: stages/mappings.py reads configs/ next to the code
RUN pip install --no-cache-dir -e . \
    && useradd --create-home --uid 1000 npx \
    && mkdir -p /data /exports && chown npx /exports

USER npx
EXPOSE 8000 5555
CMD ["nextpoints-export", "serve", "--host", "0.0.0.0", "--port", "8000"]
