# The project's image: every stage script, TensorBoard and the notebook run in it (see docker-compose.yml).
#
#   docker compose build                      # what the README uses; passes UID/GID from .env or the shell
#   docker build --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" -t image-classifier .
#
# Build arguments:
#   UID, GID     the container user's ids (default 1000); use your own so files written to the mounted
#                workspace belong to you
#   TENSORFLOW   cpu (default: tensorflow-cpu from requirements.txt) or gpu (tensorflow[and-cuda], same version)
#
# Offline builds: put wheels in ./wheelhouse first (on a connected Linux x86-64 machine with Python 3.11:
# `pip download -r requirements.txt -d wheelhouse`). When that folder holds wheels, pip installs from it
# alone (--no-index); otherwise it uses the package index.

FROM debian:bookworm-slim AS python
# Debian's python3 is 3.11 on bookworm. ca-certificates: Keras weight downloads and image search use https.
# graphviz: the architecture diagrams of scripts/summary.py (about 70 MB). fonts-noto-cjk: figures draw
# Japanese, Chinese and Korean category names instead of boxes (about 90 MB).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates graphviz fonts-noto-cjk \
    && rm -rf /var/lib/apt/lists/*


FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# `wheelhouse*` copies the wheels of the optional wheelhouse/ folder and matches nothing when it is absent,
# so the same Dockerfile builds offline or from the index. Dependencies first: editing the code does not
# reinstall TensorFlow.
COPY requirements.txt wheelhouse* /src/wheels/
ARG TENSORFLOW=cpu
RUN set -eu; \
    mv wheels/requirements.txt requirements.txt; \
    case "$TENSORFLOW" in \
      cpu) ;; \
      gpu) version="$(sed -n 's/^tensorflow-cpu==\([0-9.]*\).*/\1/p' requirements.txt)"; \
           test -n "$version"; \
           sed -i "s/^tensorflow-cpu==[0-9.]*/tensorflow[and-cuda]==$version/" requirements.txt ;; \
      *) echo "TENSORFLOW must be cpu or gpu, not '$TENSORFLOW'" >&2; exit 1 ;; \
    esac; \
    if ls wheels/*.whl > /dev/null 2>&1; then set -- --no-index --find-links wheels; else set --; fi; \
    pip install --no-cache-dir "$@" -r requirements.txt; \
    rm -rf wheels


# The package as a wheel, built with the setuptools that TensorFlow already installed (nothing fetched).
# A stage of its own so that editing the code rebuilds a few kilobytes, not the 2 GB of dependencies.
FROM build AS wheel
COPY pyproject.toml README.md ./
COPY image_classifier/ image_classifier/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .


FROM python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist
# A non-root user whose ids can match the host user's (-o: the ids may already exist in the image, e.g. a
# macOS GID 20; -l: no huge lastlog for large UIDs).
ARG UID=1000
ARG GID=1000
RUN groupadd -o -g "$GID" app \
    && useradd -l -o -m -u "$UID" -g "$GID" -s /bin/bash app \
    && mkdir -p /workspace \
    && chown app:app /workspace
WORKDIR /app
COPY scripts/ scripts/
# ./workspace inside /app is the workspace too, as in a checkout; the notebook service mounts notebook/ here.
RUN ln -s /workspace /app/workspace
ENV WORKSPACE=/workspace \
    KERAS_HOME=/workspace/keras \
    PYTHONUNBUFFERED=1
USER ${UID}:${GID}
CMD ["python", "scripts/machine_learning.py", "--help"]
