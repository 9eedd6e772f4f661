# tollgate: a rate-limiting reverse proxy / API gateway.
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 tollgate
# Config: /etc/tollgate/tollgate.toml (mount your own over it). Relative paths in the config
# resolve against the working directory, /etc/tollgate.

# --- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, against dummy sources, so this layer is reused until Cargo.toml or
# Cargo.lock change. The bench file must exist because Cargo.toml declares it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/envelope.rs \
    && cargo build --release --locked \
    && rm -rf src benches target/release/.fingerprint/tollgate-* target/release/deps/tollgate-* \
       target/release/deps/libtollgate-* target/release/tollgate*

COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked \
    && cp target/release/tollgate /usr/local/bin/tollgate \
    && /usr/local/bin/tollgate --version

# --- run -----------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tollgate

COPY --from=builder /usr/local/bin/tollgate /usr/local/bin/tollgate
COPY config/tollgate.toml /etc/tollgate/tollgate.toml
WORKDIR /etc/tollgate

# 8080: the gateway. 9901: the admin listener, which binds 127.0.0.1 by default (enough for
# the HEALTHCHECK below); set admin.listen = "0.0.0.0:9901" to reach it from outside.
EXPOSE 8080 9901
USER tollgate

# No curl in the image: bash's /dev/tcp speaks just enough HTTP for /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]

ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["--config", "/etc/tollgate/tollgate.toml", "--log-format", "json"]
