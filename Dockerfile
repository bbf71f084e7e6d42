# The ranger-py image: the same ports, environment variables and metric names as Rango's, so it
# replaces that container as it is (README, "Container").
#
#   docker build -t ranger-py .
#   docker build --build-arg BASE_IMAGE=<any Debian-like image with python3 >= 3.11 and venv> ...
#
# Both stages use `python3 -m venv /opt/venv`, so the same file builds on python:3.11-slim and on a
# plain Debian image with python3, python3-venv and python3-pip (scripts/build-image makes one).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# Only for builds behind a TLS-inspecting proxy: the CA bundle pip should trust, mounted into the
# build (scripts/build-image does). It lives in this stage, so it never reaches the final image.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
# The pinned requirements first, in a layer of their own: it is rebuilt only when they change.
# A hash-locked file is installed with --require-hashes, so a changed artefact fails the build.
COPY requirements.txt /tmp/requirements.txt
RUN if grep -q -e '--hash=' /tmp/requirements.txt; then hashes=--require-hashes; else hashes=; fi \
 && /opt/venv/bin/pip install $hashes -r /tmp/requirements.txt
# Then ranger-py itself, as a wheel installed without dependencies: every dependency is a pin above.
COPY . /src
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels /src \
 && /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}
# Fixed ids, so volume permissions and Kubernetes' runAsUser/runAsGroup can name them.
RUN groupadd --system --gid 10001 ranger \
 && useradd --system --uid 10001 --gid ranger --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ranger
# The virtualenv alone: no pip, no wheel, no compiler reaches this stage.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ranger:ranger
# 8080 websockets (RANGER_PORT), 4242 Prometheus metrics (METRICS_PORT): Rango's ports.
EXPOSE 8080 4242
# urllib, because slim images have no curl; the port follows RANGER_PORT (else PORT) as the server does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('RANGER_PORT') or os.environ.get('PORT') or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# gunicorn's graceful stop closes every websocket with 1001 within RANGER_GRACEFUL_TIMEOUT (30 s):
# give `docker stop` more than that (`--time 40`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["ranger-py", "serve"]
