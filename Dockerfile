# centime: the API (`centime serve`, the default) and the background worker
# (`centime worker`) share this one image.
FROM python:3.11-slim

# The venv lives inside the source tree (/app/.venv) and its bin/ goes first on
# PATH, so `centime` and `python` are the project's. uv uses the image's
# Python 3.11 and never downloads one.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH="/app/.venv/bin:${PATH}"

# The uv that wrote uv.lock (lock revision 5).
RUN pip install --no-cache-dir "uv==0.13.9"

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the source tree (the code finds migrations/ relative to it) and the
# project itself, installed editable into the same venv.
COPY . .
RUN uv sync --frozen --no-dev \
    && python -m compileall -q centime ledger wallet topup reconcile

# Run unprivileged. The code and venv stay root-owned (read-only to the app);
# only the data dir (.centime, used by embedded stores when no URLs are set)
# is writable.
RUN groupadd --system --gid 10001 centime \
    && useradd --system --uid 10001 --gid centime --home-dir /app --no-create-home --shell /usr/sbin/nologin centime \
    && mkdir -p /app/.centime \
    && chown centime:centime /app/.centime
USER centime

EXPOSE 8000

# Liveness only (the process answers); /readyz also checks Postgres and Redis.
# slim has no curl, so use the venv's Python. The worker has no HTTP server:
# docker-compose.yml disables this check for it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["centime", "serve", "--host", "0.0.0.0", "--port", "8000"]
