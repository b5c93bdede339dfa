# The CPU image: every role (gateway, worker, webhooks, keys, models) from one image, as a non-root user.
#   docker build -t tokenq .
# The build stage installs into a virtual environment that the runtime stage copies alone, so no compiler,
# pip cache or build context ends up in the image.
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tokenq
ENV PATH=/opt/tokenq/bin:$PATH
# torch's CPU wheels first: the default index would bring the CUDA build and its libraries (gigabytes).
RUN pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./src/
# One COPY a package (a COPY of several directories would merge their contents): every package that
# pyproject.toml's packages.find includes, which tests/unit/test_docker_images.py checks.
COPY protocol ./src/protocol
COPY jobstore ./src/jobstore
COPY gateway ./src/gateway
COPY worker ./src/worker
COPY tokenq_kernels ./src/tokenq_kernels
COPY batches ./src/batches
COPY respcache ./src/respcache
COPY tokenq ./src/tokenq
# The gateway runs from this image too, so it carries the semantic response cache (`cache`).
RUN pip install "./src[worker,cache]" && rm -rf ./src

FROM python:3.12-slim
RUN useradd --uid 10001 --create-home --home-dir /home/tokenq tokenq \
    && mkdir -p /var/lib/tokenq/models /var/lib/tokenq/secrets && chown -R tokenq:tokenq /var/lib/tokenq
COPY --from=build /opt/tokenq /opt/tokenq
# TOKENQ_HOME holds the model store (models/): mount a volume there so a model is pulled once
# (`tokenq models pull`) and every worker container reuses it.
ENV PATH=/opt/tokenq/bin:$PATH PYTHONUNBUFFERED=1 TOKENQ_HOME=/var/lib/tokenq
VOLUME /var/lib/tokenq/models
USER 10001
WORKDIR /home/tokenq
EXPOSE 8000 9101 9102
CMD ["tokenq", "gateway", "--host", "0.0.0.0", "--port", "8000"]
