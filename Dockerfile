# flux-proxy: the proxy image. Build: docker build -t flux-proxy .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY providers ./providers
COPY proxy ./proxy
COPY worker ./worker
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flux \
    && mkdir -p /data/media /data/outputs && chown -R flux:flux /data
COPY --from=build /install /usr/local
USER flux
WORKDIR /home/flux
# SQLite and uploaded media on a volume by default; set FLUX_PROXY_DATABASE_URL to a
# PostgreSQL URL (and share /data/media between replicas) to scale out. JSON logs even
# when the container is given a TTY.
ENV FLUX_PROXY_DATABASE_URL=sqlite+aiosqlite:////data/flux-proxy.db \
    FLUX_PROXY_MEDIA_DIR=/data/media \
    FLUX_PROXY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["flux-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
