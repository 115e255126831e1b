# syntax=docker/dockerfile:1
# credproxy: multi-stage build, small non-root runtime image.
#
#   docker build -t credproxy .
#   docker run --rm --name credproxy -p 8080:8080 -p 8081:8081 \
#     -v credproxy-data:/data -v "$PWD/config.toml:/etc/credproxy/config.toml:ro" \
#     -e CREDPROXY_STORE_URL=sqlite:///data/credproxy.db -e CREDPROXY_KEY_FILE=/data/credproxy.key \
#     -e SPARK_CLIENT_SECRET -e ZILLOW_CLIENT_SECRET -e ZILLOW_API_KEY -e CREDPROXY_ADMIN_TOKEN \
#     credproxy
#   docker exec credproxy credproxy session list
#
# The image sets CREDPROXY_LISTEN=0.0.0.0:8080 and CREDPROXY_ADMIN_LISTEN=0.0.0.0:8081,
# which take precedence over server.listen and server.admin_listen: inside a
# container, 127.0.0.1 would be unreachable through -p. (Other ports: -e
# CREDPROXY_LISTEN=0.0.0.0:PORT, and publish that.)
# Relative paths in the config are relative to its directory, here the
# read-only /etc/credproxy: the example's CREDPROXY_STORE_URL and
# CREDPROXY_KEY_FILE put the SQLite store and the sealing key in the
# credproxy-data volume instead (back it up: without the key the tokens are
# lost). With PostgreSQL and store.key_env (docker-compose.yml) leave both out.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crates/standins/Cargo.toml crates/standins/Cargo.toml
RUN mkdir -p src benches examples crates/standins/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs && echo 'fn main() {}' > benches/links.rs \
    && touch crates/standins/src/lib.rs \
    && cargo build --release --locked --bin credproxy \
    && rm -rf src crates/standins/src
COPY build.rs build.rs
COPY src src
COPY migrations migrations
COPY templates templates
COPY static static
COPY crates/standins/src crates/standins/src
# Make sure cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin credproxy \
    && strip target/release/credproxy

FROM debian:bookworm-slim AS runtime
# ca-certificates: not needed by credproxy (it ships webpki roots) but by
# anyone exec'ing into the container; tini reaps and forwards SIGTERM.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin credproxy \
    && mkdir -p /data /etc/credproxy && chown credproxy /data
COPY --from=build /src/target/release/credproxy /usr/local/bin/credproxy
USER 10001
WORKDIR /data
VOLUME ["/data"]
ENV CREDPROXY_CONFIG=/etc/credproxy/config.toml
# The rotation journal (store.rotation_journal) must be writable: in the volume.
ENV CREDPROXY_ROTATION_JOURNAL=/data/credproxy.rotations
ENV CREDPROXY_LISTEN=0.0.0.0:8080 CREDPROXY_ADMIN_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8081 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/credproxy"]
CMD ["serve"]
