# Multi-stage build: a static binary in a distroless, non-root image.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/proxy ./cmd/proxy

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/proxy /usr/local/bin/proxy
USER nonroot:nonroot
ENV PROXY_CONFIG=/etc/tokenproxy/proxy.yaml
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/proxy"]
CMD ["serve"]
