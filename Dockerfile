# jobd as one static executable in an otherwise empty image.
#
#   docker build -t jobd .                      (or: buildah build --pull=never -t jobd .)
#   docker run --rm -p 8080:8080 jobd
#
# The builder can be any Debian-based official Python image: --build-arg BASE=python:3.12-slim.
# Embed the result in your own image with `COPY --from=jobd /jobd /usr/local/bin/jobd`
# (examples/Dockerfile.copy-from).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        make patch gcc libc6-dev binutils patchelf musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile build.spec requirements-build.txt jobd.py ./
COPY packaging/ packaging/
COPY ci/install-build-deps.sh ci/apt-install.sh ci/
# Timestamps inside the binary (no git in the builder); pass the commit time for a release.
ARG SOURCE_DATE_EPOCH=315532800
# Only needed where HTTPS to the package index goes through a custom CA.
ARG PIP_CERT
RUN make build PYTHON=python3 \
 && mkdir -p /rootfs/tmp \
 && chmod 1777 /rootfs/tmp \
 && cp dist/jobd /rootfs/jobd

# /tmp (mode 1777) is required: the binary unpacks itself there (or in $TMPDIR) at start.
FROM scratch
COPY --from=build /rootfs/ /
EXPOSE 8080
# `jobd health` asks the jobd in the container (PORT, else 8080) for /healthz.
HEALTHCHECK --interval=30s --timeout=5s CMD ["/jobd", "health"]
ENTRYPOINT ["/jobd"]
