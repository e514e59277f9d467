# emend, CPU image. Multi-stage: build with the Rust toolchain, run on a slim Debian as a
# non-root user. The default model is fetched at start (pip, sha256-checked) into EMEND_CACHE_DIR;
# k8s/ does that in an init container onto the data volume.
#   docker build -t emend:cpu .
FROM rust:1.89-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY src src
COPY migrations migrations
COPY load-tests load-tests
RUN cargo build --release --locked --bin emend

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas0-pthread fonts-dejavu-core python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/emend emend
COPY --from=build /src/target/release/emend /usr/local/bin/emend
USER 10001:10001
ENV EMEND_CACHE_DIR=/data/cache EMEND_STATE_DIR=/data/db PIP_BREAK_SYSTEM_PACKAGES=1
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/emend"]
CMD ["serve", "--bind", "0.0.0.0:8080"]
