# keyward (the control plane: `keyward serve` and the CLI) as a small non-root image.
#
#   docker build -t keyward .
#   docker run -p 7070:7070 -v keyward-data:/data -e KEYWARD_ADMIN_TOKEN=... keyward
#
# The store is /data/keyward.db: mount a volume there. Listens on 0.0.0.0:7070.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
# rust-toolchain.toml asks for the wasm target too; this image only builds the native binary.
RUN cargo build --release --locked -p keyward --bin keyward \
 && cp target/release/keyward /usr/local/bin/keyward

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 keyward \
 && useradd --system --uid 10001 --gid keyward --home-dir /data --no-create-home keyward \
 && mkdir /data && chown keyward:keyward /data
COPY --from=build /usr/local/bin/keyward /usr/local/bin/keyward
USER 10001:10001
ENV KEYWARD_DB=/data/keyward.db \
    KEYWARD_LISTEN=0.0.0.0:7070
VOLUME ["/data"]
EXPOSE 7070
ENTRYPOINT ["keyward"]
CMD ["serve"]
