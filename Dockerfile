# The Pleiades image: `docker build . -t pleiades:0.1.0` (see deploy/README.md).
#
# The builder compiles the release binary, its dependencies in a layer of their own so that a
# change to the sources rebuilds only Pleiades itself. The runtime stage is an empty image with
# only what the binary needs at run time, taken from Debian's packages on the runtime base: the
# shared libraries it links (the C library, OpenSSL and zlib, which librdkafka links
# dynamically), the CA certificates TLS to Kafka verifies against, a non-root user and the
# configuration. No shell and no package manager: debug with `kubectl debug` or `docker cp`.
#
# Both base images are build arguments, so the image can be built from a private registry or a
# local base where the public registries cannot be reached, e.g.
#   --build-arg RUST_IMAGE=registry.example.org/rust:1.95-slim-bookworm
#   --build-arg RUNTIME_IMAGE=registry.example.org/debian:bookworm-slim
# The runtime base must be the Debian release the builder links against (bookworm here).

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# The bundled librdkafka is built with make and a C and C++ compiler, and links OpenSSL and zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libc6-dev make pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
# Debug information stays out of the image. Set for the whole stage: a profile setting that
# differed between the two builds below would rebuild every dependency.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /src
# Dependencies first: the manifests, the build script and the benchmarks (named in Cargo.toml)
# with empty sources compile every dependency into this layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY benches benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src src
COPY static static
# The build context has no git history: `--build-arg COMMIT=$(git rev-parse --short=12 HEAD)`
# puts the commit into --version and pleiades_build_info.
ARG COMMIT=""
# The copied sources may be older than the placeholder build: touching them makes cargo rebuild.
# The binary lands at /pleiades, which is what the runtime stage copies (and what
# `--build-context builder=DIR` can provide instead, with a binary built elsewhere).
RUN touch src/main.rs src/lib.rs \
 && PLEIADES_BUILD_COMMIT="${COMMIT}" cargo build --release --locked --bin pleiades \
 && cp target/release/pleiades /pleiades \
 && /pleiades --version

FROM ${RUNTIME_IMAGE} AS runtime-files
# Debian's packages for what the binary links, and the CA certificates.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /pleiades /rootfs/usr/bin/pleiades
COPY pleiades.toml /rootfs/etc/pleiades/pleiades.toml
# Into /rootfs, the file system of the image: the libraries ldd names (with the dynamic loader),
# the status records and copyright files of the packages they come from (image scanners read
# var/lib/dpkg/status.d to know their versions), the CA bundle where OpenSSL looks for it, the
# user and group 10001, and the shipped configuration listening on every interface of the
# container instead of loopback (the build fails if its two listen lines are not where this
# expects them). The state directory waits in /state for its owner. Last, the binary runs
# inside /rootfs, which fails the build if anything it needs is missing.
RUN set -eu; \
    cd /rootfs; \
    libraries=$(ldd usr/bin/pleiades | grep -o '/[^ ]*'); \
    for library in $libraries; do \
        mkdir -p ".$(dirname "$library")"; \
        cp -L "$library" ".$library"; \
    done; \
    packages=$( (for library in $libraries; do dpkg -S "*/$(basename "$library")"; done; \
                 echo "ca-certificates: ") | cut -d: -f1 | sort -u); \
    mkdir -p var/lib/dpkg/status.d; \
    for package in $packages; do \
        dpkg-query --status "$package" > "var/lib/dpkg/status.d/$package"; \
        mkdir -p "usr/share/doc/$package"; \
        cp "/usr/share/doc/$package/copyright" "usr/share/doc/$package/"; \
    done; \
    mkdir -p etc/ssl/certs usr/lib/ssl; \
    cp /etc/ssl/certs/ca-certificates.crt etc/ssl/certs/; \
    ln -s /etc/ssl/certs/ca-certificates.crt usr/lib/ssl/cert.pem; \
    ln -s /etc/ssl/certs usr/lib/ssl/certs; \
    printf 'root:x:0:0:root:/root:/usr/sbin/nologin\npleiades:x:10001:10001:Pleiades:/var/lib/pleiades:/usr/sbin/nologin\n' > etc/passwd; \
    printf 'root:x:0:\npleiades:x:10001:\n' > etc/group; \
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' > etc/nsswitch.conf; \
    sed -i 's/^listen = "127\.0\.0\.1:/listen = "0.0.0.0:/' etc/pleiades/pleiades.toml; \
    test "$(grep -c '^listen = "0\.0\.0\.0:' etc/pleiades/pleiades.toml)" = 2; \
    install -d -m 0750 /state/pleiades; \
    chroot /rootfs /usr/bin/pleiades --version; \
    chroot /rootfs /usr/bin/pleiades check-config --config /etc/pleiades/pleiades.toml

FROM scratch AS runtime
ARG COMMIT=""
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pleiades" \
      org.opencontainers.image.description="Turns the live edit stream of every Wikimedia wiki into trustworthy statistics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.source="https://github.com/pleiades-stats/pleiades" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=runtime-files /rootfs/ /
# The state directory belongs to the user (a named Docker volume starts as a copy of it).
COPY --from=runtime-files --chown=10001:10001 /state/ /var/lib/
# Every invocation reads the image's configuration unless --config names another file, so that
# `docker run IMAGE ingest --kafka.enable` works as the original image did. Relative paths in it
# (./events, ./pleiades.db) land in the state directory.
ENV PATH=/usr/bin PLEIADES_CONFIG=/etc/pleiades/pleiades.toml
WORKDIR /var/lib/pleiades
VOLUME /var/lib/pleiades
# web.listen and metrics.listen (/metrics, /healthz, /readyz).
EXPOSE 8080 9000
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
ENTRYPOINT ["pleiades"]
