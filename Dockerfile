# syntax=docker/dockerfile:1
# token-broker container image: built with cargo in the official Rust image, run from distroless as a
# non-root user. The build downloads nothing but crates (from crates.io, pinned by Cargo.lock).
#
#   docker build -t token-broker .
#   docker run --rm -p 8080:8080 -e BROKER_PUBLIC_URL=... token-broker          # serve (the default)
#   docker run --rm -e DATABASE_URL=... token-broker migrate

FROM rust:1-bookworm AS builder
WORKDIR /src
# No database is needed to build: queries use sqlx's runtime API and migrations are embedded.
ENV CARGO_TERM_COLOR=never
COPY . .
# BuildKit cache mounts keep the crate registry and compiled dependencies between builds, so a source
# change recompiles only this crate. The binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin token-broker \
 && install -D -m 0755 target/release/token-broker /out/token-broker

# cc-debian12: glibc, libgcc and CA certificates (for TLS to the IdP), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/token-broker /usr/local/bin/token-broker
# The image's user is nonroot already; saying so keeps it true if the base ever changes.
USER nonroot:nonroot
EXPOSE 8080
ENV BROKER_LISTEN_ADDR=0.0.0.0:8080 \
    BROKER_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/token-broker"]
CMD ["serve"]
