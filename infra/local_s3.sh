#!/usr/bin/env bash
# A local S3-protocol server for development: moto in server mode, on loopback only.
#   infra/local_s3.sh [PORT]        (default 5555; Ctrl-C to stop)
# Then point a config at it:  s3.endpoint_url=http://127.0.0.1:5555 s3.allow_http=true
# and give credentials through the standard AWS chain, e.g.
#   AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
# (moto accepts any). The test suite starts its own server; this is for trying things by hand.
set -euo pipefail
port="${1:-5555}"
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/moto_server" -H 127.0.0.1 -p "$port"
