FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY worker.py enqueue.py ./
RUN pip install --no-cache-dir . && useradd --system --no-create-home dispatcher \
    && mkdir -p /var/lib/dispatcher/journal && chown dispatcher /var/lib/dispatcher/journal
USER dispatcher
# SIGTERM lets each worker finish its current send and QUIT (see docker-compose stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
