# syntax=docker/dockerfile:1
# squared: build the release binary, then run it as an unprivileged user on a
# slim Debian. The default database is an SQLite file on the /var/lib/squared
# volume; set DATABASE_URL=postgres://... to join a cluster (docker/compose.yaml).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked \
    && cp target/release/squared /usr/local/bin/squared

FROM debian:bookworm-slim
# ca-certificates follows the base image's security updates; pinning it would freeze them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/squared squared
COPY --from=build /usr/local/bin/squared /usr/local/bin/squared
USER 10001
WORKDIR /var/lib/squared
ENV SQUARED_LISTEN=0.0.0.0:8080 \
    DATABASE_URL=sqlite:///var/lib/squared/squared.db \
    SQUARED_LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/var/lib/squared"]
# The client verbs double as a health check (GET /v1/jobs touches the database).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD ["squared", "list", "--limit", "1", "--server", "http://127.0.0.1:8080"]
ENTRYPOINT ["squared"]
CMD ["serve"]
