# healthgate: one image for every service; the command picks it (api, poller, gate, pruner, migrate, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed UID/GID, so the key volume keeps the same owner across image rebuilds.
RUN groupadd --system --gid 10001 healthgate \
 && useradd --system --uid 10001 --gid healthgate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin healthgate \
 && install -d -m 0700 -o healthgate -g healthgate /etc/healthgate/keys

# Non-editable install; the sources are not kept in the image.
COPY pyproject.toml README.md /tmp/src/
COPY shared /tmp/src/shared
COPY services /tmp/src/services
RUN pip install /tmp/src && rm -rf /tmp/src

ENV HEALTHGATE_KEY_FILE=/etc/healthgate/keys/health-check.key \
    HEALTHGATE_API_HOST=0.0.0.0

# A named volume mounted on /etc/healthgate/keys starts with that directory's owner and mode.
USER healthgate
WORKDIR /tmp
EXPOSE 8080 8081 8082 8083 8084

ENTRYPOINT ["healthgate"]
CMD ["api"]
